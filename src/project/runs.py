"""Run directories: what a run is on disk, and how a command finds one.

A run directory (``logs/<name>/<version>/`` by default) holds the resolved ``config.yaml``, ``checkpoints/``
(``last.ckpt`` and the best checkpoint) and what its logger writes. Commands that evaluate or export a run write a
directory of their own inside it, ``<command>_<k>/``, and change nothing else.
"""

import contextlib
import fcntl
import os
from pathlib import Path

from project.errors import ConfigError, ProjectError

CLAIMED: list[Path] = []  # the evaluation directories this process created inside a run
HELD: list[int] = []  # locks on the checkpoint directories of the runs this process trains further


def claim(directory: Path, prefix: str) -> str:
    """The name of a new directory ``<prefix>_<n>`` under ``directory``, created here: ``os.mkdir`` fails for all but
    one of the processes that ask for the same name, and the others take the next ``n``."""
    directory.mkdir(parents=True, exist_ok=True)
    numbers = [p.name.removeprefix(f"{prefix}_") for p in directory.glob(f"{prefix}_*")]
    n = max((int(k) for k in numbers if k.isdigit()), default=-1) + 1
    while True:
        try:
            (directory / f"{prefix}_{n}").mkdir()
            return f"{prefix}_{n}"
        except FileExistsError:
            n += 1


def newest_first(root: Path) -> list[Path]:
    """The run directories under ``root``, the one whose ``last.ckpt`` was written last (the run trained most recently)
    first, whatever their names: a version named ``final`` is as much a run as ``version_7``."""
    lasts = [p for p in root.glob("*/checkpoints/last.ckpt") if p.is_file()] if root.is_dir() else []
    lasts.sort(key=lambda p: (p.stat().st_mtime_ns, p.parent.parent.name), reverse=True)
    return [p.parent.parent for p in lasts]


def checkpoint(run: Path, which: str) -> Path:
    """The ``last`` or ``best`` checkpoint of the run directory ``run``, or the path ``which``."""
    from project.checkpoint import read_checkpoint

    if which not in ("last", "best"):
        return Path(which)
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"{run} has no checkpoints/last.ckpt: give a run directory under logs/ that has trained.")
    if which == "last":
        return last
    callbacks = read_checkpoint(last).get("callbacks", {})
    best = next((Path(s["best_model_path"]) for s in callbacks.values() if s.get("best_model_path")), None)
    # by name, inside this run: the run directory may have moved since it was written
    if best is None or not (last.parent / best.name).is_file():
        raise ConfigError(f"--ckpt_path best: {last.parent} holds no best checkpoint; use --ckpt_path last.")
    return last.parent / best.name


def resolve(which: str, root: Path | None) -> Path:
    """A checkpoint file from ``last`` / ``best`` (of the newest run under ``root``) or a path."""
    if which not in ("last", "best"):
        return Path(which)
    found = newest_first(root) if root else []
    if not found:
        raise ConfigError(
            f"--ckpt_path {which}: no run under {root or 'the logger directory'} has a checkpoints/last.ckpt yet; "
            "train first, or give the path of a .ckpt file."
        )
    return checkpoint(found[0], which)


def hold(checkpoints: Path) -> None:
    """Locks a run's checkpoint directory until this command ends (:func:`release`): two resumes of one run at once
    would write one last.ckpt from two trainings."""
    fd = os.open(checkpoints, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ProjectError(
            f"{checkpoints.parent} is being trained by another process right now (a resume or a fit of the same run): "
            "wait until it ends, or stop it first."
        ) from None
    HELD.append(fd)


def release(failed: bool) -> None:
    """At the end of a command: its locks let go, and where it ``failed``, the evaluation directories it created and
    wrote nothing into removed."""
    if failed:
        for directory in CLAIMED:
            with contextlib.suppress(OSError):
                directory.rmdir()
    while HELD:
        os.close(HELD.pop())
    CLAIMED.clear()


def files(run: Path) -> tuple[Path, Path]:
    """A run's ``config.yaml`` and ``checkpoints/last.ckpt``, which ``resume`` needs."""
    config, last = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    for needed in (config, last):
        if not needed.is_file():
            raise ConfigError(f"resume {run}: {needed} does not exist; give a run directory under logs/.")
    return config, last
