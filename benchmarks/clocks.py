"""Callbacks the benchmark adds to template runs (in process, or ``--trainer.callbacks+=clocks.X`` with benchmarks/ on
PYTHONPATH)."""

import json
import os
import time

import torch
from lightning.pytorch import Callback


class PairedEpochs(Callback):
    """Training images/s of each template epoch (first batch's start to last batch's end, validation excluded), each
    followed at once by one epoch of ``other`` (a callable that trains an epoch and returns its images/s) in the same
    process: the two are timed seconds apart, under the same load of a noisy machine."""

    def __init__(self, other):
        self.other, self.template, self.paired = other, [], []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.images, self.start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images, self.end = self.images + len(batch[1]), time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.template.append(self.images / (self.end - self.start))
        self.paired.append(self.other())


class TestAccuracyClock(Callback):
    """After every epoch, the test accuracy and the wall time since the process was launched (BENCH_T0)."""

    def __init__(self, out: str):
        self.out, self.points = out, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if dm.test_set is None:
            dm.setup("test")
        pl_module.eval()
        with torch.no_grad():
            x, y = dm.test_set.x, dm.test_set.y
            hits = sum(
                (pl_module(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item()  # the model normalises
                for i in range(0, len(y), 1000)
            )
        pl_module.train()
        self.points.append(
            {
                "epoch": trainer.current_epoch,
                "seconds": time.time() - float(os.environ["BENCH_T0"]),
                "test_acc": hits / len(y),
            }
        )
        with open(self.out, "w") as f:
            json.dump(self.points, f)


IMPORTED = time.time()  # jsonargparse imports this module while it parses the config: torch and Lightning are in


class LaunchClock(Callback):
    """Wall-clock times at which a run reaches each phase before its first training step, written to ``path``."""

    def __init__(self, path: str):
        self.path, self.stamps = path, {"imports": IMPORTED, "config parsed, objects built": time.time()}

    def setup(self, trainer, pl_module, stage) -> None:
        self.stamps["data checked and loaded"] = time.time()

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self.stamps["fit start (summary, graph, checkpoint)"] = time.time()

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.stamps["sanity check"] = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.stamps["first step"] = time.time()
            with open(self.path, "w") as f:
                json.dump(self.stamps, f)
