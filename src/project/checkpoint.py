"""Checkpoints that survive kills and never hold garbage.

Lightning 2.6 alone stages saves in $TMPDIR (atomic only on the same filesystem), stores no RNG state
(so a resumed run diverges from an uninterrupted one), can keep a NaN score as "best", and exits 0 on
SIGTERM. :class:`SafeModelCheckpoint` closes each of these gaps; the CLI always uses it.
"""

import os
import pickle
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from project.errors import ConfigError, NonFiniteError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in its destination directory, fsyncs it and renames it into
    place, so a kill at any moment leaves the old file or the new one, never a torn one. Refuses to write
    non-finite weights, and loads with ``weights_only=True`` (no arbitrary pickle) unless told otherwise."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        for name, tensor in checkpoint.get("state_dict", {}).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise NonFiniteError(f"Refusing to write {path}: weight {name} is not finite.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # the rename itself is durable only once the directory entry is on disk
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        return super().load_checkpoint(path, map_location, weights_only=weights_only is not False)


def check_weights_only(path: str | Path) -> None:
    """Raise ConfigError unless ``path`` loads as tensors and plain types (mmap: no tensor data is read)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{path} holds objects other than tensors and plain types, and unpickling them could run code "
            f"({reason}). If you trust its source, load it in Python with torch.load(..., weights_only=False) "
            "and save its tensors again."
        ) from None


def rng_states() -> dict:
    """torch, CUDA, numpy and Python RNG states, as tensors and plain types so ``weights_only`` loads them."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class SafeModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (best by ``monitor`` + ``last.ckpt``, rewritten every epoch) that also:

    - writes atomically and loads with ``weights_only=True`` (:class:`AtomicCheckpointIO`);
    - stores the RNG states, so resuming from an epoch-boundary checkpoint reproduces the uninterrupted run;
    - stops with :class:`NonFiniteError` on a NaN/inf training loss or monitored metric, before anything
      non-finite can be saved as best or last;
    - on SIGTERM or SIGINT (Ctrl+C), finishes the current batch, writes ``last.ckpt`` and exits with
      128 + the signal number (Lightning alone exits 0), saying how to resume.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        self._signal: int | None = None
        if stage == "fit":
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            signal.signal(signal.SIGINT, self._previous_sigint)

    def _on_sigint(self, signum: int, frame) -> None:
        if self._signal is not None:  # a second Ctrl+C: quit now, without the checkpoint
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        self._signal = signum
        # Lightning's SIGTERM path stops every rank at the same batch; send Ctrl+C down it too
        os.kill(os.getpid(), signal.SIGTERM)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss):
            self._stop_non_finite(trainer, f"the training loss is {loss.item()}")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and not trainer.sanity_checking and not torch.isfinite(score):
            self._stop_non_finite(trainer, f"{self.monitor} is {score.item()}")
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_even_without_a_new_best(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_even_without_a_new_best(trainer)

    def _save_last_even_without_a_new_best(self, trainer: Trainer) -> None:
        # Lightning 2.6 rewrites last.ckpt only at steps that saved a new top-k checkpoint, so an epoch
        # that does not improve would be lost by a kill (skipping also covers "already saved at this step")
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def check_monitor_top_k(self, trainer: Trainer, current: torch.Tensor | None = None) -> bool:
        return current is not None and bool(torch.isfinite(current)) and super().check_monitor_top_k(trainer, current)

    def _stop_non_finite(self, trainer: Trainer, what: str) -> None:
        good = self.last_model_path or self.best_model_path
        raise NonFiniteError(
            f"Training stopped at epoch {trainer.current_epoch}, step {trainer.global_step}: {what}. "
            "Nothing from this step on was saved. "
            + (f"The last good checkpoint is {good}; " if good else "No checkpoint was written yet; ")
            + "lower the learning rate or set trainer.gradient_clip_val, then "
            + (f"resume with --ckpt_path {good}." if good else "train again.")
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.fast_dev_run:  # Lightning 2.6 writes last.ckpt here even in a dry run
            super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit" or not self.dirpath:
            super().on_exception(trainer, pl_module, exception)
            return
        signum = self._signal or signal.SIGTERM
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        exception.code = 128 + signum
        if trainer.is_global_zero:
            run = Path(self.dirpath).parent
            print(
                f"\nStopped by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}; saved {path}. Resume with: python -m project resume {run}",
                file=sys.stderr,
            )
