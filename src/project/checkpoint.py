"""Checkpoints that survive kills and signals and never hold garbage.

Lightning 2.6 alone stages saves in $TMPDIR and moves them into place, a copy across filesystems (Lightning issue
19970), stores no RNG state, so a resumed run diverges from an uninterrupted one (issue 17543, closed as won't fix),
can keep a NaN score as "best" (issues 2636, 1008), exits 0 on SIGTERM (issue 19916; PR 21623 is on master, in no
release), leaves a checkpoint taken in the middle of a validation that cannot be resumed, and writes nothing in the
first epoch when ``every_n_train_steps`` is set (issue 20185). :class:`SafeModelCheckpoint` closes each of these gaps;
the CLI always uses it. The private members of ModelCheckpoint it calls are named where they are used, with the
Lightning change each one works around.
"""

import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.plugins.io import TorchCheckpointIO

from project import runs
from project.errors import NonFiniteError, ProjectError
from project.files import replacing
from project.signals import Interrupted, StopSignals


class SaveError(ProjectError):
    """A checkpoint could not be written (a full disk, a read-only directory)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint whole or not at all (:func:`project.files.replacing`, fsynced): a kill at any moment leaves
    the old file or the new one, and a failed write (a full disk) leaves the old checkpoint as it was, with one message
    that names it. Loads with ``weights_only=True`` (no arbitrary pickle)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        try:
            with replacing(path, durable=True) as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as raised:
            # torch.save's zip writer reports a failed write as a RuntimeError raised while handling the OSError
            err = raised if isinstance(raised, OSError) else raised.__context__
            if not isinstance(err, OSError):
                raise
            last = path.with_name("last.ckpt")
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written"
            if path.exists():
                kept = f"{path} still holds the previous checkpoint"
            raise SaveError(f"could not write {path}: {err.strerror or err}; {kept}. Free space or fix the "
                            "directory's permissions, then resume.") from None  # fmt: skip

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        return super().load_checkpoint(path, map_location, weights_only=weights_only is not False)


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
    - writes ``last.ckpt`` when training starts, at every ``every_n_train_steps`` from the first step on, and at
      the end of every epoch, so a kill at any moment leaves a run that ``resume`` continues;
    - never writes non-finite weights, and stops with :class:`NonFiniteError` on a NaN/inf training loss (read at
      logging steps and epoch ends only: reading it every step would stall a GPU) or monitored metric;
    - on SIGINT or SIGTERM (:class:`StopSignals`) stops at the next point that can be kept: after the training batch
      in progress, after the validation in progress, or at once in a sanity check, test or predict, writing
      ``last.ckpt`` where training was under way and exiting with 128 + the signal's number.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # StopSignals decides where a run stops; Lightning's own SIGTERM handling would stop inside a validation (a
        # checkpoint that cannot be resumed) and exit 0 (Lightning issue 19916, PR 21623 in no release yet): its
        # notifier is private (_signal_connector), the only way to turn that handling off in 2.6
        trainer._signal_connector._sigterm_notifier_fn = lambda signum, frame: None

    @property
    def _last_path(self) -> str:
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def load_state_dict(self, state_dict: dict) -> None:
        # a run resumed by another path than it was written with (absolute, relative, from another directory), or
        # moved since: its checkpoints are this directory's files of the same names. Lightning would keep only the best
        # path, forget the others and write last-v1.ckpt beside a last.ckpt that then stays stale (its PRs 12045 and
        # 12225 drop the state of a changed dirpath; issues 15705 and 11379 are open).
        old = state_dict.get("dirpath")
        last = state_dict.get("last_model_path") or ""
        same_run = (
            old
            and self.dirpath
            and (
                os.path.realpath(old) == os.path.realpath(self.dirpath)
                or os.path.isfile(os.path.join(self.dirpath, os.path.basename(last)))
            )
        )
        if same_run and old != self.dirpath:

            def here(path: str) -> str:
                return os.path.join(self.dirpath, os.path.basename(path)) if path else path

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                **{key: here(state_dict.get(key) or "") for key in ("best_model_path", "kth_best_model_path",
                                                                    "last_model_path")},
                "best_k_models": {here(k): v for k, v in state_dict.get("best_k_models", {}).items()},
            }  # fmt: skip
        super().load_state_dict(state_dict)

    # -- what is written, and when

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # parameters and buffers only: a metric's state may be -inf legitimately (MaxMetric before its first value)
        for name, tensor in [*pl_module.named_parameters(), *pl_module.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                self._stop_non_finite(trainer, f"weight {name} is not finite")
        checkpoint["rng_states"] = rng_states()
        # the run it belongs to, for a checkpoint kept apart from it (checkpoint.dirpath elsewhere, or copied out)
        checkpoint["run_dir"] = str(runs.directory(trainer).resolve())
        # early stopping's decision, not a stop of max_time or max_steps, which a resume with more of them continues
        early = trainer.early_stopping_callback
        stopped = early is not None and early.stopping_reason is not EarlyStoppingReason.NOT_STOPPED
        checkpoint["stopped_early"] = getattr(self, "_finished", False) and stopped

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # restored where training starts: only training steps (dropout, augmentation) draw from these RNGs (the data
        # order has its own generator), and what runs before them in a resumed run did not run in the original
        self._rng_states = checkpoint.get("rng_states")
        # a run that early stopping ended is not trained further by resume: fit ends at once and its best checkpoint
        # is tested (a run that reached max_epochs ends so by itself, and a larger max_epochs extends it)
        if trainer.state.fn == "fit":
            stopped, early = bool(checkpoint.get("stopped_early")), trainer.early_stopping_callback
            if stopped and early is not None:  # a resume given a larger early_stopping.patience trains on
                state = checkpoint.get("callbacks", {}).get(early.state_key, {})
                stopped = state.get("wait_count", 0) >= early.patience
            trainer.should_stop = stopped

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(self, "_rng_states", None):
            set_rng_states(self._rng_states)
            self._rng_states = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a fresh run has a checkpoint before its first step: kill it in the sanity check or the first epoch and
        # `resume` still continues it
        if not trainer.ckpt_path and not trainer.fast_dev_run and self.dirpath:
            self._write_last(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validated = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int):
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if last_batch or trainer.global_step % trainer.log_every_n_steps == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None and not torch.isfinite(loss):
                self._stop_non_finite(trainer, f"the training loss is {loss.item()}")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Lightning 2.6 defers every_n_train_steps saves to the first validation (its PR 21106; issue 20185), so a kill
        # in the first epoch would lose them; the step count is only in a private attribute
        n = self._every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save_last_even_without_a_new_best(trainer)
        # the last batch's stop waits for the validation after it: its checkpoint is the epoch's
        if not last_batch and self._asked_to_stop(trainer, at_log_step=True):
            self._stop(trainer, save=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and not trainer.sanity_checking and not torch.isfinite(score):
            self._stop_non_finite(trainer, f"{self.monitor} is {score.item()}")
        super().on_validation_end(trainer, pl_module)
        self._validated = getattr(self, "_validated", False) or not trainer.sanity_checking
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_even_without_a_new_best(trainer)
        # a stop waits for the checkpoint that ends the epoch, written here or at the end of the training epoch
        at_epoch_end = not trainer.sanity_checking and self._should_save_on_train_epoch_end(trainer)
        if (trainer.state.fn != "fit" or not at_epoch_end) and self._asked_to_stop(trainer):
            self._stop(trainer, save=trainer.state.fn == "fit" and not trainer.sanity_checking)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # every epoch ends with a checkpoint, also one that no validation follows (check_val_every_n_epoch above 1, a
        # val_check_interval in steps), which Lightning 2.6 would leave to the next validation
        if self._should_save_on_train_epoch_end(trainer) or not getattr(self, "_validated", False):
            self._save_last_even_without_a_new_best(trainer)
        if self._asked_to_stop(trainer):
            self._stop(trainer, save=True)

    def _write_last(self, trainer: Trainer) -> None:
        if not self.save_last:  # checkpoint.save_last false: the run keeps its best checkpoints only
            return
        # named before the write, as Lightning does: the path is part of the state saved, and a resumed run that did
        # not know it would write last-v1.ckpt beside it
        self.last_model_path = self._last_path
        trainer.save_checkpoint(self._last_path, weights_only=False)

    def _save_last_even_without_a_new_best(self, trainer: Trainer) -> None:
        # Lightning 2.6.0 (its PR 21244) rewrites last.ckpt only at steps that saved a new top-k checkpoint, so an epoch
        # that does not improve would be lost by a kill (skipping also covers "already saved at this step"); the
        # three methods called here are ModelCheckpoint's private ones that its own save of last.ckpt uses
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def check_monitor_top_k(self, trainer: Trainer, current: torch.Tensor | None = None) -> bool:
        return current is not None and bool(torch.isfinite(current)) and super().check_monitor_top_k(trainer, current)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.fast_dev_run:  # Lightning 2.6 writes last.ckpt here even in a dry run (since its PR 20960)
            super().on_train_end(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a run that early stopping ended says so in last.ckpt (see on_load_checkpoint); on_fit_end, not on_train_end,
        # which Lightning skips in a resumed run that had nothing left to train
        self._finished = True
        if trainer.should_stop and not trainer.fast_dev_run and self.dirpath:
            self._write_last(trainer)

    def _stop_non_finite(self, trainer: Trainer, what: str) -> None:
        good = self.last_model_path or self.best_model_path
        raise NonFiniteError(
            f"Training stopped at epoch {trainer.current_epoch}, step {trainer.global_step}: {what}. "
            "Nothing from this step on was saved. "
            + (f"The last good checkpoint is {good}; " if good else "No checkpoint was written yet; ")
            + "lower the learning rate or set trainer.gradient_clip_val, then "
            + (f"resume with --ckpt_path {good}." if good else "train again.")
        )

    # -- stopping on a signal

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn != "fit" and self._asked_to_stop(trainer, at_log_step=False):
            self._stop(trainer, save=False)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._asked_to_stop(trainer, at_log_step=False):
            self._stop(trainer, save=False)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._asked_to_stop(trainer, at_log_step=False):
            self._stop(trainer, save=False)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._asked_to_stop(trainer):  # under DDP, where the batches above do not ask
            self._stop(trainer, save=False)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._asked_to_stop(trainer):
            self._stop(trainer, save=False)

    def _asked_to_stop(self, trainer: Trainer, at_log_step: bool | None = None) -> bool:
        """Whether a signal asks this run to stop. Under DDP every process must stop at the same batch, which takes a
        collective: only at logging steps (``at_log_step=True``) and epoch ends (``None``), never inside evaluation."""
        if trainer.world_size == 1:
            return StopSignals.signum is not None
        if at_log_step is False or (at_log_step and trainer.global_step % trainer.log_every_n_steps):
            return False
        return trainer.strategy.reduce_boolean_decision(StopSignals.signum is not None, all=False)

    def _stop(self, trainer: Trainer, save: bool) -> None:
        signum = StopSignals.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        run = runs.directory(trainer)
        if trainer.state.fn != "fit" and getattr(self, "_finished", False):  # the test of the best checkpoint after fit
            raise Interrupted(signum, f"Stopped by {name} while testing the best checkpoint; the training itself is "
                              f"complete and saved. Test it with: python -m project resume {run}")  # fmt: skip
        if trainer.state.fn != "fit":
            raise Interrupted(signum, f"Stopped by {name} during {trainer.state.fn.value}; it wrote nothing. Run it "
                              "again.")  # fmt: skip
        if save and not trainer.fast_dev_run:
            self._write_last(trainer)
        if not trainer.is_global_zero:  # the other processes of a DDP run stop with it, silently
            raise Interrupted(signum, "")
        where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        saved = f"saved {self._last_path}" if self.dirpath and not trainer.fast_dev_run else "nothing to save"
        resume = f" Resume with: python -m project resume {run}"
        if not self.save_last:
            newest = self.best_model_path or "none yet"
            saved = f"saved nothing (checkpoint.save_last false); the newest checkpoint is {newest}"
            resume = f" resume continues from it: python -m project resume {run}" if self.best_model_path else ""
        print(file=sys.stderr)  # after the progress bar's line
        raise Interrupted(signum, f"Stopped by {name} at {where}; {saved}.{resume}")
