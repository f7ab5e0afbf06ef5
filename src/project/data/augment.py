"""Augmentations applied to a whole batch at once, on whichever device the batch is on."""

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
