"""Learning-rate schedules that take their rate from the optimizer, so that a config states one learning rate."""

import torch


class OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """torch's ``OneCycleLR``, whose peak is the optimizer's ``lr`` (of each parameter group) unless ``max_lr`` is
    given: a config sets the rate once, as the optimizer's, whatever the scheduler. The run's length (``total_steps``)
    is filled in by the model unless given."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float | list[float] | None = None, **kwargs):
        peak = max_lr if max_lr is not None else [group["lr"] for group in optimizer.param_groups]
        super().__init__(optimizer, peak, **kwargs)
