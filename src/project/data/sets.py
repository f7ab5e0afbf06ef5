"""The two ways a split is held: decoded ``uint8`` tensors in memory, or image files decoded batch by batch. Both
serve a whole batch per call (``__getitems__``) as ``(uint8 images (N, C, H, W), int64 labels)``."""

from pathlib import Path

import torch
from torch.utils.data import Dataset

from project.images import decode


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class: of labels ``(N,)``, or of 0/1 rows ``(N, classes)`` (multi-label)."""
    return labels.sum(0) if labels.ndim == 2 else torch.bincount(labels, minlength=num_classes)


class Tensors(Dataset):
    """Images and labels held in memory; the DataLoader asks for whole batches through ``__getitems__``,
    so a batch costs one index operation instead of one Python call and one collate per image."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def subset(self, idx: torch.Tensor) -> "Tensors":
        return Tensors(self.x[idx], self.y[idx])

    def __getitems__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # to the data's device without waiting (data.on_device): a blocking copy would drain the GPU's queue each step
        idx = torch.as_tensor(indices).to(self.y.device, non_blocking=True)
        return self.x[idx], self.y[idx]


class Files(Dataset):
    """Image files decoded when a batch is asked for (in DataLoader workers when there are any)."""

    def __init__(self, files: list[Path], labels: torch.Tensor, size: tuple[int, int], channels: int):
        self.files, self.y, self.size, self.channels = files, labels, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, idx: torch.Tensor) -> "Files":
        return Files([self.files[i] for i in idx.tolist()], self.y[idx], self.size, self.channels)

    def __getitems__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices)
        x = torch.stack([decode(self.files[i], self.size, self.channels) for i in idx.tolist()])
        return x, self.y[idx]
