"""Callbacks for tests that look inside child processes (importable there with tests/ on PYTHONPATH)."""

import itertools
import json
import os
import signal as signal_module
import time
import traceback
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.overrides import TorchFunctionMode


class DumpMetrics(Callback):
    """Each rank writes what it logged, as it saw it, to ``<directory>/rank<global_rank>.json``."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
            path = self.directory / f"rank{trainer.global_rank}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps({"world_size": trainer.world_size, "global_step": trainer.global_step, **metrics})
            )


class Fault(Callback):
    """Sends ``signal`` (``SIGINT``, ``SIGTERM`` or ``SIGKILL``) to this very process at one moment of a run:

    - ``sanity``: the first sanity-check batch; ``train0`` / ``val0``: batch ``batch`` of epoch 0's training /
      validation; ``train1`` / ``val1``: the same in epoch 1; ``test``: the test after fit; ``predict``;
    - ``save``: inside the first checkpoint write after step 0, when the file is written but not yet renamed into
      place (a kill there must leave the previous checkpoint).

    Once only: the file ``once`` records that it fired (a resumed run has this callback in its config too).
    """

    def __init__(self, signal: str, phase: str, once: str, batch: int = 1):
        self.signum, self.phase, self.once, self.batch = getattr(signal_module, signal), phase, Path(once), batch

    def _fire(self) -> None:
        if self.once.exists():
            return
        self.once.touch()
        os.kill(os.getpid(), self.signum)
        time.sleep(0.5)  # a SIGKILL takes effect here; the others have been noted by then

    def _at(self, phase: str, trainer, batch_idx: int) -> None:
        if phase == self.phase and batch_idx == self.batch:
            self._fire()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            if self.phase == "sanity" and batch_idx == 0:
                self._fire()
        else:
            self._at(f"val{trainer.current_epoch}", trainer, batch_idx)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._at(f"train{trainer.current_epoch}", trainer, batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._at("test", trainer, batch_idx)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._at("predict", trainer, batch_idx)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.phase != "save" or trainer.global_step == 0 or self.once.exists():
            return
        self.phase = "done"
        save = torch.save

        def save_then_fire(obj, f, *args, **kwargs):
            torch.save = save
            save(obj, f, *args, **kwargs)
            f.flush()  # the whole file is in the temporary file, not yet renamed over the checkpoint
            self._fire()

        torch.save = save_then_fire


class FileSizeLimit(Callback):
    """From the first training step on, no file of this process may grow past ``limit`` bytes (RLIMIT_FSIZE, with
    SIGXFSZ ignored so that a write past it fails with EFBIG): a disk that fills up, for the checkpoints only, which
    are larger than the event files."""

    def __init__(self, limit: int):
        self.limit = limit

    def on_train_start(self, trainer, pl_module) -> None:
        import resource

        signal_module.signal(signal_module.SIGXFSZ, signal_module.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.RLIM_INFINITY))


# what reads a tensor's values back to the host (on a GPU, each waits for every queued kernel): the conversions to
# Python, and the ops whose output's size depends on the values
READS = frozenset(
    {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
     torch.Tensor.__index__, torch.Tensor.numpy, torch.unique, torch.Tensor.unique, torch.unique_consecutive,
     torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.masked_select, torch.Tensor.masked_select}
)  # fmt: skip


class CountReads(Callback):
    """Counts the reads of tensor values (:data:`READS`) of each training step, from one batch's start to the next
    (fetching, the step, every hook, the progress bar), and writes them to ``path`` as ``{"steps": [...], "sample":
    [where the reads of the second step were]}``."""

    class Mode(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.reads: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in READS:
                outside = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
                self.reads.append(f"{func.__name__} at {outside[-1].filename}:{outside[-1].lineno}")
            return func(*args, **(kwargs or {}))

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.mode, self.starts = self.Mode(), []
        self.mode.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(len(self.mode.reads))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.mode.__exit__(None, None, None)
        steps = [b - a for a, b in itertools.pairwise(self.starts)]
        sample = self.mode.reads[self.starts[1] : self.starts[2]] if len(self.starts) > 2 else []
        self.path.write_text(json.dumps({"steps": steps, "sample": sample}))


class NoSyncBetweenSteps(Callback):
    """CUDA's sync debug mode set to raise from the start of the second training step to the start of the last one
    (fetching, the step, every hook), which a run must have with ``log_every_n_steps`` above its step count."""

    def __init__(self, log_every_n_steps: int):
        self.log_every_n_steps = log_every_n_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert trainer.log_every_n_steps == self.log_every_n_steps > trainer.num_training_batches
        torch.cuda.set_sync_debug_mode("error" if 1 <= batch_idx < trainer.num_training_batches - 1 else 0)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.cuda.set_sync_debug_mode(0)

    def on_exception(self, trainer, pl_module, exception) -> None:
        torch.cuda.set_sync_debug_mode(0)


class Branchy(torch.nn.Module):
    """A net whose forward takes a branch on a tensor's value: it trains, and torch.export cannot trace it."""

    def __init__(self, in_shape: tuple[int, int, int], num_outputs: int):
        super().__init__()
        self.fc = torch.nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        return out if x.mean() > 0 else -out
