"""Experiment directories: ``configs/experiments/<name>/`` holds a ``base.yaml`` and one YAML per variant."""

import contextlib
import io
from pathlib import Path

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
