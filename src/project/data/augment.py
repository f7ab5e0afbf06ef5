"""Augmentations applied to a whole batch at once, on whichever device the batch is on."""

import math

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad each side by ``padding`` and cut a random ``H x W`` window per image (torchvision's
    ``RandomCrop(size, padding)``), as one gather instead of a loop over images."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    images = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[images, channels, rows, cols]


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_erasing(
    x: torch.Tensor, p: float, value: torch.Tensor, scale=(0.02, 0.33), ratio=(0.3, 3.3)
) -> torch.Tensor:
    """With probability ``p`` per image, set a random rectangle of ``scale`` of its area and aspect ``ratio`` to
    ``value`` (per channel), as torchvision's ``RandomErasing``; one box per image (torchvision's draws one box for the
    whole batch), as masks instead of a loop over images."""
    n, _, h, w = x.shape
    area = torch.empty(n, device=x.device).uniform_(*scale) * (h * w)
    aspect = torch.empty(n, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    height = (area * aspect).sqrt().round().clamp(1, h)
    width = (area / aspect).sqrt().round().clamp(1, w)
    top = (torch.rand(n, device=x.device) * (h - height + 1)).floor()
    left = (torch.rand(n, device=x.device) * (w - width + 1)).floor()
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    inside_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    box = inside_rows[:, :, None] & inside_cols[:, None, :] & (torch.rand(n, device=x.device) < p)[:, None, None]
    return torch.where(box[:, None], value.view(1, -1, 1, 1).to(x.dtype), x)
