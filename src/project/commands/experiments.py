"""Experiment directories (``configs/experiments/<name>/`` holds a ``base.yaml`` and one YAML per variant), and what
``compare`` and ``search`` share to run fits of their own: the config a fit would run, where its run goes, and the
wait for it."""

import contextlib
import io
import signal
import subprocess
from pathlib import Path

from project import runs
from project.errors import ConfigError


def variants(directory: Path) -> dict[str, list[str]]:
    """``{variant: config args}``, each variant stacked over the directory's ``base.yaml`` (if any)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory; give one such as configs/experiments/optimizers.")
    base = directory / "base.yaml"
    stack = [f"--config={base}"] if base.is_file() else []
    files = sorted(p for p in directory.glob("*.yaml") if p != base)
    if not files:
        raise ConfigError(f"{directory} holds no variant configs (*.yaml besides base.yaml).")
    return {p.stem: [*stack, f"--config={p}"] for p in files}


def resolve(args: list[str], what: str) -> str:
    """The whole config that ``fit ARGS`` would run (``--print_config``), parsed in this process; ConfigError with
    the parser's message if it does not parse (``what`` would not start)."""
    from project.cli import CLI

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            CLI(args=["fit", *args, "--print_config"])
        except SystemExit as exit:
            if exit.code:
                text = err.getvalue()
                why = " ".join(text[text.rfind("error:") + 6 :].split()) if "error:" in text else text.strip()
                raise ConfigError(f"{what} would not start: {why} (fit {' '.join(args)})") from None
    return out.getvalue()


def placement(config: dict, directory: Path, name: str) -> list[str]:
    """The arguments that put the run of a fit of ``config`` (a resolved config) in ``directory/name/``: its logger's
    save_dir and name, where its logger keeps runs as ``save_dir/name/version``, otherwise the trainer's
    default_root_dir (see :mod:`project.runs`). They go last, after the user's own arguments."""
    logger = runs.first_logger(config.get("trainer", {}).get("logger"))
    if runs.versioned(logger):
        return [f"--trainer.logger.init_args.save_dir={directory}", f"--trainer.logger.init_args.name={name}"]
    return [f"--trainer.default_root_dir={directory / name}"]


def wait_for(child: subprocess.Popen) -> int:
    """The exit code of a fit started in this terminal. Ctrl+C reaches the fit too (it is in this terminal's process
    group), which stops where it can be kept: this waits for it, so that a rerun resumes nothing half-written."""
    try:
        return child.wait()
    except KeyboardInterrupt:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)  # in case the signal came to this process alone
        child.wait()
        raise
