"""Images decoded once and kept: what a source decodes (a folder's files, a map-style dataset's items) is cached under
``data_dir`` as ``uint8`` tensors, with each image's pixel sums (the train split's mean and std come from them, whatever
the split turns out to be), which images decoded, and a SHA-256 of the tensors, so that a damaged cache is decoded
again instead of trained on."""

import hashlib
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from project.files import replacing
from project.signals import Interrupted, StopSignals

VERSION = 4  # bump when what a cache holds, or how an image is decoded, changes


def _as_list(batch: list) -> list:
    return batch


def decode_all(
    items: Dataset, shape: tuple[int, int, int], num_workers: int, keep: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every item of ``items`` (``(uint8 image of shape, label)``, or ``(None, label)`` for one that cannot be decoded)
    once, in ``num_workers`` processes: the images if ``keep``, the labels, each image's per-channel sum and sum of
    squares (float64, in 0..1 units), and which items decoded."""
    n = len(items)
    images = torch.empty(n, *shape, dtype=torch.uint8) if keep else None
    labels = torch.full((n,), -1, dtype=torch.int64)
    sums = torch.zeros(n, 2, shape[0], dtype=torch.float64)
    ok = torch.zeros(n, dtype=torch.bool)
    i = 0
    for batch in DataLoader(items, batch_size=64, num_workers=num_workers, collate_fn=_as_list):
        if StopSignals.signum is not None:  # Ctrl+C: a large folder takes minutes; nothing is cached
            raise Interrupted(StopSignals.signum, "Stopped while decoding the images; nothing was written.")
        for image, label in batch:
            labels[i] = label
            if image is not None:
                ok[i] = True
                pixels = image.double().div_(255).flatten(1)
                sums[i, 0], sums[i, 1] = pixels.sum(1), pixels.square().sum(1)
                if keep:
                    images[i] = image
            i += 1
    return images, labels, sums, ok


def read(path: Path, key: str) -> dict | None:
    """The cache at ``path`` if it holds ``key`` and is intact, else None (it is then built again)."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, weights_only=True, mmap=True)
    except Exception:  # a cache that cannot be read (a kill mid-write cannot cause it, see write) is rebuilt
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    if cached.get("digest") != digest(cached):  # bytes changed on disk since it was written
        print(f"note: the decoded images in {path} are damaged; decoding them again.", file=sys.stderr)
        return None
    return cached


def write(path: Path, cached: dict) -> dict:
    """Writes ``cached`` with its digest, whole or not at all: two runs building the same cache at once, or a kill
    mid-write, leave a whole file."""
    cached = {**cached, "digest": digest(cached)}
    with replacing(path) as f:
        torch.save(cached, f)
    return cached


def digest(cached: dict) -> str:
    """A checksum of the cached tensors (about 0.6 s per GB here)."""
    sha = hashlib.sha256()
    for name in ("images", "labels", "sums", "ok"):
        if cached.get(name) is not None:
            sha.update(cached[name].contiguous().flatten().view(torch.uint8).numpy())
    return sha.hexdigest()
