"""Run directories: what a run is on disk, and how a command finds one, whatever the logger.

A run directory holds the resolved ``config.yaml``, ``run.json`` (what the run ran on), ``record.csv`` (what it
measured, epoch by epoch), ``checkpoints/`` (``last.ckpt`` and the best checkpoint) and what its logger writes there.
Commands that evaluate or export a run write a directory of their own inside it, ``<command>_<k>/``, and change nothing
else. Where runs go depends on the first logger:

- a logger that lays its runs out as ``save_dir/name/version`` with its own ``log_dir`` there (TensorBoard, CSV, and
  any logger of the same form): ``<save_dir>/<name>/version_<n>/``, the version claimed here;
- any other logger (MLflow, W&B: they keep their records in stores of their own) or none:
  ``<trainer.default_root_dir, or logs>/version_<n>/``, which becomes the run's ``default_root_dir``, the directory
  Lightning gives a run without a logger of that form.
"""

import fcntl
import importlib
import inspect
import os
import shutil
from pathlib import Path

import torch

from project.errors import ConfigError, ProjectError

CLAIMED: list[Path] = []  # the run and evaluation directories this process created
HELD: list[int] = []  # locks on the checkpoint directories of the runs this process trains further
RUNS = Path("logs")  # where runs go whose logger has no directory layout of its own (or without a logger)


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


def first_logger(logger) -> object | None:
    """The config of the first logger (the one Lightning takes its directories from), or None for no logger."""
    if isinstance(logger, list):
        return logger[0] if logger else None
    return logger if logger not in (None, False, True) else None


def versioned(logger) -> bool:
    """Whether a logger's class (from its config, parsed or as YAML) lays runs out as ``save_dir/name/version`` and
    has its ``log_dir`` there, below a ``root_dir``, as Lightning's TensorBoardLogger and CSVLogger do."""
    class_path = logger.get("class_path") if isinstance(logger, dict) else getattr(logger, "class_path", None)
    if not class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    from lightning.fabric.loggers import Logger

    # Lightning's Logger has a root_dir and log_dir of None; the loggers of this form have their own
    own = inspect.getattr_static(cls, "root_dir", None) is not inspect.getattr_static(Logger, "root_dir", None)
    return own and {"save_dir", "name", "version"} <= inspect.signature(cls).parameters.keys()


def root_of(logger, default_root_dir: str | None) -> Path:
    """The directory this logger config's runs are claimed in."""
    if versioned(logger):
        return Path(logger.init_args.save_dir) / str(logger.init_args.name)
    return Path(default_root_dir) if default_root_dir else RUNS


def new(logger, root: Path) -> Path:
    """A new run's directory under ``root``: the version the logger's config names (``version: final``, a SLURM job's
    id), or the next ``version_<n>``, claimed."""
    given = logger.init_args.get("version") if versioned(logger) else None
    if given is not None:
        (root / str(given)).mkdir(parents=True, exist_ok=True)
        return root / str(given)
    return root / claim(root, "version")


def place(config, run: Path, sub: str | None = None) -> None:
    """Points a parsed config (a command's) at the run directory ``run`` (or its sub-directory ``sub``), for whichever
    logger it has: the logger's save_dir, name and version, or the trainer's default_root_dir (see :func:`adopt`)."""
    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    if versioned(first_logger(config.trainer.logger)):
        for logger in filter(versioned, loggers):  # a list of them writes into the one directory
            logger.init_args.save_dir, logger.init_args.name = str(run.parent.parent), run.parent.name
            logger.init_args.version = f"{run.name}/{sub}" if sub else run.name
            if "sub_dir" in logger.init_args:  # the version holds it
                logger.init_args.sub_dir = None
    else:
        config.trainer.default_root_dir = str(run / sub if sub else run)


def adopt(trainer) -> None:
    """A run whose logger keeps no directory of the ``save_dir/name/version`` form (MLflow, W&B) keeps its checkpoints
    in its own directory, ``<default_root_dir>/checkpoints/``, as a run without a logger does: Lightning would put
    them under the logger's save_dir, by the logger's run id, which a resumed run does not have again."""
    callback = trainer.checkpoint_callback
    logger = trainer.loggers[0] if trainer.loggers else None
    if callback is not None and callback.dirpath is None and logger is not None and not logger.root_dir:
        callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))


def run_of(path: Path, checkpoint: dict) -> Path | None:
    """The run directory a checkpoint file belongs to: the one it is inside (``<run>/checkpoints/``, wherever the run
    has been moved), or the one it was written by, if that still exists."""
    if path.parent.name == "checkpoints" and (path.parents[1] / "config.yaml").is_file():
        return path.parents[1]
    written = checkpoint.get("run_dir")
    return Path(written) if written and (Path(written) / "config.yaml").is_file() else None


def directory(trainer) -> Path:
    """This run's directory, or the evaluation's inside a run: the first logger's ``log_dir`` where it is one of the
    ``save_dir/name/version`` form, otherwise the trainer's ``default_root_dir`` (see :func:`place`)."""
    logger = trainer.loggers[0] if trainer.loggers else None
    return Path(logger.log_dir if logger is not None and logger.root_dir else trainer.default_root_dir)


def checkpoints_of(run: Path) -> Path:
    """The directory of a run's checkpoints: ``<run>/checkpoints/``, or the ``checkpoint.dirpath`` its ``run.json``
    names (where it is not a ``checkpoints/`` directory inside the run)."""
    import json

    try:
        named = json.loads((run / "run.json").read_text()).get("checkpoints")
    except (OSError, ValueError):
        named = None
    here = run / "checkpoints"
    return Path(named) if named and not here.is_dir() and Path(named).is_dir() else here


def newest_checkpoint(directory: Path) -> Path | None:
    """``last.ckpt``, or where a run keeps none (``checkpoint.save_last`` false) the checkpoint written last."""
    if (directory / "last.ckpt").is_file():
        return directory / "last.ckpt"
    written = [p for p in directory.glob("*.ckpt") if p.is_file()] if directory.is_dir() else []
    return max(written, key=lambda p: p.stat().st_mtime_ns) if written else None


def newest_first(root: Path) -> list[Path]:
    """The run directories under ``root``, the one whose newest checkpoint was written last (the run trained most
    recently) first, whatever their names: a version named ``final`` is as much a run as ``version_7``."""
    found = []
    for config in root.glob("*/config.yaml") if root.is_dir() else ():
        if (newest := newest_checkpoint(checkpoints_of(config.parent))) is not None:
            found.append((newest.stat().st_mtime_ns, config.parent.name, config.parent))
    return [run for *_, run in sorted(found, reverse=True)]


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents, tensors memory-mapped (nothing is read until used), or ConfigError saying why it
    cannot be one: missing, empty, truncated, not a PyTorch file, or holding objects that unpickling could run."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--ckpt_path {path} is a directory: give a .ckpt file, or best or last (with --config "
                          f"{path}/config.yaml for a run's own).")  # fmt: skip
    if not path.is_file():
        raise ConfigError(f"--ckpt_path {path}: no such file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ValueError... for a bad file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise ConfigError(
                f"{path} holds objects other than tensors and plain types, and unpickling them could run code "
                f"({reason}). If you trust its source, load it in Python with torch.load(..., weights_only=False) "
                "and save its tensors again."
            ) from None
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # what torch.save writes is a zip archive
        size = path.stat().st_size
        what = "it is empty" if size == 0 else "it is truncated or corrupt" if zipped else "it is not a PyTorch file"
        others = sorted(p for p in path.parent.glob("*.ckpt") if p != path and p.is_file())
        instead = f"Use another one: {', '.join(map(str, others[:3]))}" if others else "There is no other beside it"
        raise ConfigError(
            f"{path} is not a checkpoint that can be read ({size} bytes): {what}. {instead}; or train again."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is a PyTorch file but not a Lightning checkpoint (it has no state_dict).")
    return checkpoint


def checkpoint(run: Path, which: str) -> Path:
    """The ``last`` or ``best`` checkpoint of the run directory ``run``, or the path ``which``."""
    if which not in ("last", "best"):
        return Path(which)
    directory = checkpoints_of(run)
    newest = newest_checkpoint(directory)
    if newest is None:
        raise ConfigError(f"{run} has no checkpoint in {directory}: give a run directory that has trained, or a .ckpt "
                          "file.")  # fmt: skip
    if which == "last":
        if newest.name != "last.ckpt":
            raise ConfigError(f"{directory} holds no last.ckpt (the run was trained with checkpoint.save_last false): "
                              "give --ckpt_path best, or a .ckpt file.")  # fmt: skip
        return newest
    callbacks = read_checkpoint(newest).get("callbacks", {})
    best = next((Path(s["best_model_path"]) for s in callbacks.values() if s.get("best_model_path")), None)
    # by name, inside this run: the run directory may have moved since it was written
    if best is None or not (directory / best.name).is_file():
        raise ConfigError(f"--ckpt_path best: {directory} holds no best checkpoint; use --ckpt_path last.")
    return directory / best.name


def named_run(logger, root: Path) -> Path | None:
    """The run a config names, where it exists: its versioned logger's ``version`` (a run's own ``config.yaml`` names
    it), or ``root`` itself when that is a run directory (a run without such a logger)."""
    version = logger.init_args.get("version") if versioned(logger) else None
    for run in ([root / str(version)] if version is not None else []) + [root]:
        if (run / "config.yaml").is_file():
            return run
    return None


def resolve(which: str, root: Path | None, run: Path | None = None) -> Path:
    """A checkpoint file from ``last`` / ``best`` (of ``run``, or else the newest run under ``root``) or a path."""
    if which not in ("last", "best"):
        return Path(which)
    if run is not None:
        return checkpoint(run, which)
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
    """At the end of a command: its locks let go, and where it ``failed``, the directories it created that hold
    nothing of what ran (no checkpoint, no predictions: a logger's first events at most) removed."""
    if failed:
        for claimed in CLAIMED:
            if claimed.is_dir() and not any(claimed.rglob("*.ckpt")) and not any(claimed.rglob("*.csv")):
                shutil.rmtree(claimed, ignore_errors=True)
    while HELD:
        os.close(HELD.pop())
    CLAIMED.clear()


def files(run: Path) -> tuple[Path, Path]:
    """A run's ``config.yaml`` and the checkpoint ``resume`` continues from: ``last.ckpt``, or where the run keeps
    none (``checkpoint.save_last`` false) its newest checkpoint, which it says."""
    import sys

    config, newest = run / "config.yaml", newest_checkpoint(checkpoints_of(run))
    for needed in (config, newest if newest else checkpoints_of(run) / "last.ckpt"):
        if not needed.is_file():
            raise ConfigError(f"resume {run}: {needed} does not exist; give a run directory under logs/.")
    if newest.name != "last.ckpt":
        print(f"note: {run} keeps no last.ckpt (checkpoint.save_last false): resuming from its newest checkpoint, "
              f"{newest}.", file=sys.stderr)  # fmt: skip
    return config, newest
