"""Experiment directories: ``configs/experiments/<name>/`` holds a ``base.yaml`` and one YAML per variant."""

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


def config_paths(config_args: list[str]) -> list[Path]:
    """The ``--config`` (``-c``) files among command-line arguments, in order."""
    following = [*config_args[1:], ""][: len(config_args)]
    return [Path(a.split("=", 1)[1] if "=" in a else b)
            for a, b in zip(config_args, following, strict=True) if a.split("=")[0] in ("--config", "-c")]  # fmt: skip


def config_stems(config_args: list[str]) -> list[str]:
    """The names (file stems) of the ``--config`` files among command-line arguments, in order."""
    return [p.stem for p in config_paths(config_args)]
