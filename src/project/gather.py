"""Gathering a tensor from every process of a run, when the processes may hold different numbers of rows."""

import torch


def gather(module, values: torch.Tensor) -> torch.Tensor:
    """``values`` of every process, concatenated in rank order: under DDP an evaluation's or a prediction's processes
    may hold one image more or less than each other (no image is repeated to even them out), and ``all_gather`` takes
    equal shapes, so each pads to the longest and cuts back after. ``module``: the LightningModule."""
    if module.trainer.world_size == 1:
        return values
    sizes = module.all_gather(torch.tensor(len(values), device=values.device)).tolist()
    padded = torch.cat([values, values.new_zeros((max(sizes) - len(values), *values.shape[1:]))])
    return torch.cat([part[:n] for part, n in zip(module.all_gather(padded), sizes, strict=True)])
