"""The transfer experiment's data (README, "Fine-tuning"): some of Fashion-MNIST's classes, as a user's own dataset
class would give them to ``project.data.MapDataset``; at most ``per_class`` images of each class, the same ones for
every run (drawn by ``seed``)."""

from pathlib import Path

import torch
from torch.utils.data import Dataset

from project.data import registry


class FashionClasses(Dataset):
    """Fashion-MNIST's ``classes`` (indices), relabelled 0.. in the order given; ``train`` or the official test
    split."""

    def __init__(self, root: str, classes: list[int], train: bool = True, per_class: int | None = None, seed: int = 0):
        registry.prepare("fashion_mnist", root, download=True)
        x, y = registry.load("fashion_mnist", root, train=train)
        generator = torch.Generator().manual_seed(seed)
        keep = []
        for label in classes:
            where = (y == label).nonzero().flatten()
            keep.append(where[torch.randperm(len(where), generator=generator)[:per_class]].sort().values)
        index = torch.cat(keep)
        self.images = x[index]
        self.labels = torch.cat([torch.full((len(k),), i) for i, k in enumerate(keep)])
        self.classes = [registry.DATASETS["fashion_mnist"].classes[c] for c in classes]
        self.root = Path(root)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
