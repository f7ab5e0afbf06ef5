"""Weight averaging (EMA, SWA) on Lightning's ``WeightAveraging``: validation, checkpoints, and what loads them (test,
predict, export) use the average; a checkpoint's ``current_model_state`` keeps the raw weights for resuming."""

import itertools

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging


class _AveragedFromFirstUpdate:
    """For Lightning's weight-averaging callbacks: until the first update the average is the initial weights, which
    Lightning 2.6 would validate and save anyway (Lightning issue 21724; PRs 21732 and 21754 open). Here validation and
    checkpoints use the current weights until then. ``_average_model`` and ``_latest_update_step`` are
    WeightAveraging's private state, which it has no public accessor for."""

    def _averaged(self) -> bool:
        return self._average_model is not None and bool(self._average_model.n_averaged > 0)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swapped = self._averaged()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._averaged():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self._averaged():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # only fit resumes the raw weights and the average; validate, test and predict (also the test after fit)
        # evaluate the checkpoint's state_dict, which is the average
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class EMA(_AveragedFromFirstUpdate, EMAWeightAveraging):
    """An exponential moving average of the weights (and BatchNorm statistics), ``decay`` per optimizer step:
    Lightning's ``EMAWeightAveraging``, so validation, checkpoints, and what loads them (test, predict, export) use
    the average; ``current_model_state`` in a checkpoint keeps the raw weights for resuming. The update is one fused
    ``lerp`` over all tensors that reads nothing back (``AveragedModel.update_parameters`` in torch 2.14 reads its
    counter each step, a GPU sync: pytorch issue 175085, PR 157705). With ``warmup`` (as timm's EMA), the decay at
    step ``t`` is ``min(decay, (1 + t) / (10 + t))``: early on the average follows the weights closely instead of
    holding on to the random initial ones.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
    ):
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)  # fmt: skip
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            average = self._average_model
            if getattr(self, "_tensors", None) is None:  # the same tensors every step: paired once
                mine = itertools.chain(average.module.parameters(), average.module.buffers())
                pairs = list(zip(mine, itertools.chain(pl_module.parameters(), pl_module.buffers()), strict=True))
                floats = [(mine, theirs.detach()) for mine, theirs in pairs if mine.is_floating_point()]
                # counters such as BatchNorm's num_batches_tracked are copied, not averaged
                counters = [(mine, theirs) for mine, theirs in pairs if not mine.is_floating_point()]
                self._tensors = ([m for m, _ in floats], [t for _, t in floats], pairs, counters)
            averages, currents, pairs, counters = self._tensors
            if self._latest_update_step == 0:  # the first update copies, as AveragedModel's does
                for mine, theirs in pairs:
                    mine.copy_(theirs)
            else:
                step = trainer.global_step
                decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
                torch._foreach_lerp_(averages, currents, 1 - decay)
                for mine, theirs in counters:
                    mine.copy_(theirs)
            average.n_averaged += 1
            self._latest_update_step = trainer.global_step


class SWA(_AveragedFromFirstUpdate, WeightAveraging):
    """Stochastic weight averaging: the equal average of the weights (and BatchNorm statistics) at the end of each
    epoch's training from ``start_epoch`` on (counted from 0), used like :class:`EMA`'s. Taken at the epoch's last
    batch, before its validation, so the average that is validated and checkpointed includes that epoch. Lightning's
    ``StochasticWeightAveraging`` callback also changes the learning rate and swaps the average in only when training
    ends; this one leaves the schedule to the configured scheduler."""

    def __init__(self, start_epoch: int):
        super().__init__()
        self.start_epoch = start_epoch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        last = batch_idx + 1 == trainer.num_training_batches
        if last and trainer.current_epoch >= self.start_epoch and trainer.global_step > self._latest_update_step:
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = trainer.global_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return False  # Lightning's per-step and end-of-epoch updates: replaced by the one above
