"""Where a data module's images come from: one interface, :class:`Source`, for the built-in datasets
(:class:`Builtin`), a folder of images (:class:`ImageFolder`) and any map-style dataset, torchvision's own or yours,
named in a config by its class_path and init_args (:class:`MapDataset`). A new source is a subclass; the data module
splits, normalises, augments and serves whatever a source loads, the same way for every one."""

import functools
import hashlib
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import register_type
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import Dataset

from project.data import cache as caches
from project.data import folder as folders
from project.data import registry
from project.data.sets import Files, Tensors
from project.errors import ConfigError, DataError
from project.images import conform

Size = int | tuple[int, int]


class AbsolutePath(str):
    """A path that a run's saved config holds absolute, so that the config names the same files from any directory."""


def _absolute(value) -> AbsolutePath:
    if not str(value).strip():  # "" would be the working directory
        raise ValueError("an empty path: give a directory")
    return AbsolutePath(Path(value).expanduser().absolute())


register_type(AbsolutePath, serializer=str, deserializer=_absolute)


def size_of(image_size: Size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"image_size={image_size}: give a size of 1 pixel or more (an int, or [height, width]).")
    return size


@dataclass
class Images:
    """One split as a source loads it: ``uint8 (N, C, H, W)`` images with ``int64`` labels, in memory or decoded from
    files batch by batch; where the source has them, each image's pixel sums (the statistics of whatever turns out to be
    the train split are measured from them), each image's file (predictions name it) and a name that stays the image's
    own when other images are added or removed (a carved split then keeps its images)."""

    set: Tensors | Files
    sums: torch.Tensor | None = None  # (N, 2, C): per channel, the sum and the sum of squares, in 0..1 units
    paths: list[Path] | None = None
    names: list[str] | None = None


class Source(ABC):
    """What a source says before it decodes an image (``title``, ``classes``, ``shape``, which of its own
    ``splits`` it has besides ``train``, ``size`` of its train split, the ``mean`` and ``std`` where it knows them),
    what it does once per node (:meth:`prepare`: fetch, check, decode into a cache), and each split it has
    (:meth:`load`). A split a source lacks ("val", "test") is carved from its train split by the data module."""

    mean: tuple[float, ...] | None = None  # per channel, in 0..1 units; None: measured on the train split
    std: tuple[float, ...] | None = None
    multilabel = False  # True: labels are 0/1 rows (N, classes), any number of classes an image

    @property
    @abstractmethod
    def title(self) -> str: ...

    @property
    @abstractmethod
    def classes(self) -> tuple[str, ...]: ...

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, int]: ...

    @property
    @abstractmethod
    def splits(self) -> tuple[str, ...]:
        """The splits the source has of its own: ``train``, and any of ``val`` and ``test``."""

    @abstractmethod
    def size(self) -> int:
        """Images in the train split (before validation and test images are carved from it)."""

    @abstractmethod
    def prepare(self, data_dir: Path, workers: int) -> None: ...

    @abstractmethod
    def load(self, split: str, data_dir: Path, workers: int) -> Images: ...

    def fingerprint(self, data_dir: Path) -> dict:
        """What identifies the source's images (checksums, a listing), for a run's record; empty where it has none."""
        return {}


class Builtin(Source):
    """MNIST, Fashion-MNIST or CIFAR-10, as the registry knows them (files checked against their checksums, a local
    copy used where a system package installs one, downloaded by torchvision where ``download`` and a network allow).
    ``data.source: fashion_mnist`` is short for this class with that ``name``."""

    def __init__(self, name: Literal["mnist", "fashion_mnist", "cifar10"] = "fashion_mnist", download: bool = True):
        if name not in registry.DATASETS:
            raise ConfigError(
                f"data.source {name!r} is not a built-in dataset: choose one of {', '.join(registry.DATASETS)}."
            )
        self.name, self.download, self.info = name, download, registry.DATASETS[name]
        self.mean, self.std = self.info.mean, self.info.std

    title = property(lambda self: self.info.title)
    classes = property(lambda self: self.info.classes)
    shape = property(lambda self: self.info.shape)
    splits = ("train", "test")

    def size(self) -> int:
        return self.info.train_size

    def prepare(self, data_dir: Path, workers: int) -> None:
        registry.prepare(self.name, data_dir, self.download)

    def load(self, split: str, data_dir: Path, workers: int) -> Images:
        return Images(Tensors(*registry.load(self.name, data_dir, train=split == "train")))

    def fingerprint(self, data_dir: Path) -> dict:
        return {"dataset": self.name, "md5": dict(self.info.md5)}  # the files are checked against these before use


class ImageFolder(Source):
    """A folder of a user's images, one sub-folder per class, with or without ``train/``, ``val/``, ``test/`` split
    folders (:mod:`project.data.folder`): decoded at ``image_size`` with ``channels`` (1: grayscale, 3: RGB) once, into
    a cache under ``data_dir``; a folder larger than ``in_memory_max_mb`` decoded is read from disk batch by batch (by
    the data module's ``num_workers``)."""

    def __init__(
        self, root: AbsolutePath, image_size: Size = 64, channels: Literal[1, 3] = 3, in_memory_max_mb: int = 2048
    ):
        if in_memory_max_mb < 0:
            raise ConfigError(f"data.source.in_memory_max_mb={in_memory_max_mb} cannot be negative.")
        self.root, self.size_hw, self.channels, self.in_memory_max_mb = (
            Path(root),
            size_of(image_size),
            channels,
            in_memory_max_mb,
        )
        self._loaded = None

    title = property(lambda self: f"image folder {self.root}")
    shape = property(lambda self: (self.channels, *self.size_hw))

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        return folders.classes_of(self.root)

    @functools.cached_property
    def _layout(self) -> folders.Layout:
        return folders.scan(self.root)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._layout.splits)

    def size(self) -> int:
        return len(self._layout.splits["train"][0])

    def _args(self, data_dir: Path, workers: int) -> tuple:
        return self._layout, self.size_hw, self.channels, data_dir, self.in_memory_max_mb, workers

    def prepare(self, data_dir: Path, workers: int) -> None:
        folders.cache(*self._args(data_dir, workers))

    def fingerprint(self, data_dir: Path) -> dict:
        # the names, sizes and times of its files, which key its cache
        return {"folder": str(self.root), "listing": folders.listing_key(self._layout, self.size_hw, self.channels)}

    def load(self, split: str, data_dir: Path, workers: int) -> Images:
        if self._loaded is None:
            self._loaded = folders.load(*self._args(data_dir, workers))
        data = self._loaded
        paths = data.paths[split]
        return Images(data.sets[split], data.sums[split], paths, [os.path.relpath(p, data.layout.root) for p in paths])


class CSVLabels(ImageFolder):
    """Images listed in a CSV file with their labels (:func:`project.data.folder.scan_csv`): a header with ``path``
    (relative to the CSV's folder) and ``label``, and optionally ``split`` (``train``, ``val``, ``test``; a split it
    lacks is carved from train). Decoded, cached, split and predicted as a folder's images are; ``classes`` sets their
    order (and which labels are known), else the train rows' labels, sorted. ``multilabel``: any number of labels an
    image, as ``label`` ``a|b|c`` or as a 0/1 column per label; the labels are then 0/1 rows ``(N, classes)``."""

    def __init__(
        self,
        csv: AbsolutePath,
        image_size: Size = 64,
        channels: Literal[1, 3] = 3,
        classes: list[str] | None = None,
        in_memory_max_mb: int = 2048,
        multilabel: bool = False,
    ):
        super().__init__(AbsolutePath(Path(csv).parent), image_size, channels, in_memory_max_mb)
        self.csv, self.given_classes, self.multilabel = Path(csv), classes, multilabel

    title = property(lambda self: f"CSV {self.csv}")

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        return self._layout.classes

    @functools.cached_property
    def _layout(self) -> folders.Layout:
        return folders.scan_csv(self.csv, self.given_classes, self.multilabel)

    def fingerprint(self, data_dir: Path) -> dict:
        return {"csv": str(self.csv), "listing": folders.listing_key(self._layout, self.size_hw, self.channels)}


class _Conformed(Dataset):
    """A map-style dataset's items as ``(uint8 image, label)``, or ``(None, label)`` where the image cannot be
    converted: the items of :func:`project.data.cache.decode_all`."""

    def __init__(self, dataset: Dataset, size: tuple[int, int], channels: int):
        self.dataset, self.size, self.channels = dataset, size, channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        image, label = self.dataset[i][:2]
        try:
            return conform(image, self.size, self.channels), int(label)
        except (TypeError, ValueError, RuntimeError):  # not an image in any of the forms conform takes
            return None, int(label)


def _describe(factory: Callable) -> str:
    """What a dataset factory from a config builds: its class and arguments, without the memory addresses that a
    default ``repr`` holds (they differ in every process)."""
    cls = next((a for a in getattr(factory, "args", ()) if isinstance(a, type)), factory)
    name = f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', repr(cls))}"
    keywords = ", ".join(f"{k}={v!r}" for k, v in sorted(getattr(factory, "keywords", {}).items()))
    return re.sub(r" at 0x[0-9a-f]+", "", f"{name}({keywords})")


class MapDataset(Source):
    """Any map-style dataset whose items are ``(image, label)`` (torchvision's datasets, or a ``Dataset`` of yours):
    ``train``, and optionally ``val`` and ``test``, each a dataset class with its arguments, built when first needed::

        data:
          source:
            class_path: project.data.MapDataset
            init_args:
              train: {class_path: torchvision.datasets.STL10, init_args: {root: data, split: train, download: true}}
              test: {class_path: torchvision.datasets.STL10, init_args: {root: data, split: test, download: true}}
              image_size: 96

    The images (PIL images, ``uint8`` tensors, float tensors in [0, 1] or numpy arrays) are converted to ``channels``
    and resized to ``image_size`` once, and cached under ``data_dir`` as the built-in datasets are held (``uint8`` in
    memory); the cache is keyed by the dataset's class, arguments and length and by a sample of its images, so another
    dataset or changed files decode again. ``classes``: the class names, or their number, where the dataset has no
    ``classes`` attribute."""

    def __init__(
        self,
        train: Callable[[], Dataset],
        image_size: Size = 32,
        channels: Literal[1, 3] = 3,
        val: Callable[[], Dataset] | None = None,
        test: Callable[[], Dataset] | None = None,
        classes: list[str] | int | None = None,
    ):
        self.factories = {name: f for name, f in (("train", train), ("val", val), ("test", test)) if f is not None}
        self.size_hw, self.channels, self.given_classes = size_of(image_size), channels, classes
        self._made: dict[str, Dataset] = {}

    shape = property(lambda self: (self.channels, *self.size_hw))
    splits = property(lambda self: tuple(self.factories))

    def dataset(self, split: str) -> Dataset:
        if split not in self._made:
            try:
                self._made[split] = self.factories[split]()
            except (OSError, RuntimeError, ValueError) as err:  # torchvision's for files that are missing or corrupt
                reason = " ".join(str(err).split())
                raise DataError(
                    f"data.source.{split} {_describe(self.factories[split])} cannot be built: {reason}"
                ) from None
        return self._made[split]

    @property
    def title(self) -> str:
        return type(self.dataset("train")).__name__

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        given = self.given_classes
        if isinstance(given, int):
            return tuple(str(i) for i in range(given))
        names = given if given is not None else getattr(self.dataset("train"), "classes", None)
        if not names:
            raise ConfigError(
                f"data.source: {self.title} has no classes attribute; give the class names "
                "(data.source.classes: [cat, dog, ...]) or their number (data.source.classes: 10)."
            )
        return tuple(str(n) for n in names)

    def size(self) -> int:
        return len(self.dataset("train"))

    def _key(self, split: str) -> tuple[str, str]:
        """The cache's file name and key for a split: the dataset's class and arguments, the size and channels, and a
        sample of the items themselves (the same arguments over changed files are another dataset)."""
        dataset = self.dataset(split)
        if not len(dataset):
            raise DataError(f"data.source.{split} {_describe(self.factories[split])} holds no items.")
        items = _Conformed(dataset, self.size_hw, self.channels)
        n = len(items)
        described = f"{caches.VERSION} {_describe(self.factories[split])} {self.size_hw} {self.channels}"
        sample = hashlib.sha256(f"{described} {n}".encode())
        for i in sorted({0, n // 2, n - 1}):
            image, label = items[i]
            sample.update(b"" if image is None else image.numpy().tobytes())
            sample.update(str(label).encode())
        which = hashlib.sha256(described.encode()).hexdigest()[:16]
        return f"{type(dataset).__name__}-{split}-{which}.pt", sample.hexdigest()

    def _cache(self, split: str, data_dir: Path, workers: int) -> dict:
        name, key = self._key(split)
        path = Path(data_dir) / "datasets" / name
        cached = caches.read(path, key)
        if cached is None:
            items = _Conformed(self.dataset(split), self.size_hw, self.channels)
            images, labels, sums, ok = caches.decode_all(items, self.shape, workers, keep=True)
            cached = caches.write(path, {"key": key, "images": images, "labels": labels, "sums": sums, "ok": ok})
        return cached

    def prepare(self, data_dir: Path, workers: int) -> None:
        for split in self.factories:
            self._cache(split, data_dir, workers)

    def fingerprint(self, data_dir: Path) -> dict:
        # each split's dataset and arguments, and the digest of a sample of its images, which key its cache
        return {split: {"dataset": _describe(f), "sample": self._key(split)[1]} for split, f in self.factories.items()}

    def load(self, split: str, data_dir: Path, workers: int) -> Images:
        cached = self._cache(split, data_dir, workers)
        ok, labels = cached["ok"], cached["labels"]
        if (bad := (~ok).nonzero().flatten().tolist()) and rank_zero_only.rank == 0:
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            print(f"warning: skipped {len(bad)} of {len(ok)} items of data.source.{split} ({self.title}) whose "
                  f"image is not a PIL image, tensor or array: items {shown}", file=sys.stderr)  # fmt: skip
        labels = labels[ok]
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(
                f"data.source.{split} ({self.title}) has labels in [{labels.min()}, {labels.max()}], and "
                f"{len(self.classes)} classes: labels must be 0..{len(self.classes) - 1} (data.source.classes)."
            )
        return Images(Tensors(cached["images"][ok], labels), cached["sums"][ok])
