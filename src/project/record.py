"""What a run ran on and what it measured, kept in its own directory whatever the logger: ``run.json`` (the code's
commit and changes, the packages, torch and its CUDA and cuDNN, the machine, the data's fingerprint, each time the run
trained) and ``record.csv`` (every metric the run logged, at each validation and test, with the seconds since it
began). ``compare`` reads these, not a logger's files."""

import csv
import functools
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from project import runs
from project.files import replacing

TEMPLATE = Path(__file__).resolve().parents[2]  # the repository the package is installed from (pip install -e .)


def _git(directory: Path) -> dict | None:
    """The commit of the git checkout ``directory`` is in, whether its tracked files differ from it, and how."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=30, check=True)
        return done.stdout

    try:
        top = git("rev-parse", "--show-toplevel").strip()
        commit = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD")
    except (OSError, subprocess.SubprocessError):  # not a checkout, or no git
        return None
    return {"directory": top, "commit": commit, "dirty": bool(diff), "diff": diff}


@functools.cache  # what is installed does not change while a process runs
def packages() -> dict[str, str]:
    """Each installed distribution's name and version, from the names of the ``<name>-<version>.dist-info`` folders
    on ``sys.path`` (reading every METADATA file, as importlib.metadata does, takes 0.2 s at every launch)."""
    found = {}
    for folder in map(Path, sys.path):
        for info in folder.glob("*.dist-info") if folder.is_dir() else ():
            name, _, version = info.name.removesuffix(".dist-info").partition("-")
            found.setdefault(name.lower().replace("_", "-"), version)
    return dict(sorted(found.items()))


def environment(trainer: Trainer, pl_module: LightningModule) -> dict:
    """Everything besides the config that decides what a run computes, as plain JSON."""
    places = {TEMPLATE, Path.cwd()}  # the template's checkout, and the user's where their own files are imported from
    code = {}
    for place in sorted(places):
        if (found := _git(place)) is not None:
            code[found.pop("directory")] = found
    data = trainer.datamodule
    return {
        "started": time.time(),
        "command": ["python", "-m", "project", *sys.argv[1:]],
        "code": code,
        "python": sys.version.split()[0],
        "packages": packages(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "machine": {
            "host": socket.gethostname(),
            "system": platform.platform(),
            "processor": platform.machine(),
            "cpus": os.cpu_count(),
            "world size": trainer.world_size,
        },
        # what the data module says identifies its data (file checksums, a folder's listing), where it says
        "data": data.fingerprint() if callable(getattr(data, "fingerprint", None)) else None,
        "parameters": sum(p.numel() for p in pl_module.parameters()),
    }


def write(trainer: Trainer, pl_module: LightningModule) -> None:
    """Adds this session to the run's ``run.json`` (a resumed run trains in several), with the run's checkpoint
    directory; the code's changes go to ``code.diff`` beside it."""
    directory = runs.directory(trainer)
    path = directory / "run.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {"sessions": []}
    session = environment(trainer, pl_module)
    diffs = [f"# {place} (against {found['commit']})\n{found.pop('diff')}" for place, found in session["code"].items()
             if found["diff"]]  # fmt: skip
    if diffs:
        with replacing(directory / "code.diff") as f:
            f.write("\n".join(diffs).encode())
    # a checkpoint directory of the user's choice (checkpoint.dirpath) outside the run: where resume finds it; the
    # default (resolved after this, where it is Lightning's) is the run's checkpoints/, which moves with the run
    callback = trainer.checkpoint_callback
    custom = callback.dirpath if callback and callback.dirpath else None
    if custom and Path(custom).resolve() != (directory / "checkpoints").resolve():
        record["checkpoints"] = custom
    record = {**record, "sessions": [*record.get("sessions", []), session]}
    with replacing(path) as f:
        f.write((json.dumps(record, indent=2) + "\n").encode())


class MetricsRecord(Callback):
    """Appends the metrics a run logged to ``record.csv`` in its directory: a row per training epoch (its training
    loss and accuracy and its validation's metrics), and one per test, with the epoch, the step and the seconds since
    the run began: what ``compare`` tabulates and plots, whatever the logger. An epoch's row is written once the next
    epoch starts or the fit ends: Lightning 2.6 logs the module's epoch metrics after every callback's
    ``on_train_epoch_end`` but the checkpoint's and early stopping's."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.writes = not trainer.fast_dev_run and trainer.is_global_zero  # a dry run writes nothing
        self.path = runs.directory(trainer) / "record.csv"
        self.begun, self.rows = time.time(), []
        try:  # a resumed run goes on with its record, and counts its seconds from where the record began
            with open(self.path) as f:
                self.rows = list(csv.DictReader(f))
            self.begun -= float(self.rows[-1]["seconds"]) if self.rows else 0.0
        except (OSError, KeyError, ValueError):
            self.rows = []

    def _add(self, trainer: Trainer, stage: str, epoch: int) -> None:
        values = {k: f"{v.item():.6g}" for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.rows.append({"stage": stage, "epoch": epoch, "step": trainer.global_step,
                          "seconds": f"{time.time() - self.begun:.2f}", **values})  # fmt: skip
        text = io.StringIO()
        writer = csv.DictWriter(text, list(dict.fromkeys(k for row in self.rows for k in row)))
        writer.writeheader()
        writer.writerows(self.rows)
        with replacing(self.path) as f:
            f.write(text.getvalue().encode())

    def _epoch_ended(self, trainer: Trainer) -> None:
        epoch = trainer.current_epoch - 1  # Lightning has counted the epoch that ended
        recorded = any(row["stage"] == "fit" and int(row["epoch"]) >= epoch for row in self.rows)
        trained = any(k.startswith("train/") for k in trainer.callback_metrics)  # not a resume's first epoch start
        if self.writes and epoch >= 0 and trained and not recorded:
            self._add(trainer, "fit", epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_ended(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_ended(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.writes:
            self._add(trainer, "test", trainer.current_epoch)
