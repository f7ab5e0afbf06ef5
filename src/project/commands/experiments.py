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
