"""The LightningDataModule that serves any :class:`~project.data.sources.Source`, and the contract every data module
meets for the template's commands and callbacks (:class:`ImageData`)."""

import hashlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from project.data import cache as caches
from project.data import folder as folders
from project.data.augment import random_crop, random_erasing, random_hflip
from project.data.sets import Tensors, class_counts
from project.data.sources import Builtin, Images, Source
from project.errors import ConfigError, DataError

BuiltinName = Literal["mnist", "fashion_mnist", "cifar10"]


class ImageData(Protocol):
    """What the template asks of a data module, :class:`ImageDataModule` or yours (``--data FILE.Class``), besides
    being a ``LightningDataModule``. Checked when a run starts (:func:`check`).

    Required:

    - ``shape``: ``(channels, height, width)`` of every image in a batch: the net is built for it.
    - ``classes``: the class names, in label order: the model has one output per class (one for two classes), and
      reports and ``predictions.csv`` name them.
    - batches ``(images, labels)``: ``uint8`` images ``(N, C, H, W)`` in 0..255, or floats in [0, 1]; ``int64``
      labels ``(N,)`` (-1 for a predicted image without one), or, for training, class probabilities
      ``(N, len(classes))`` (mixup, cutmix).

    Optional:

    - ``mean``, ``std``: per channel, in 0..1 units, the training images' statistics, read once ``setup("fit")`` has
      run: the model normalises with them and keeps them in its checkpoints. Without them the net sees images in [0, 1].
    - ``predict_paths``: after ``setup("predict")``, each predicted image's file, in order (``predictions.csv``'s
      ``file`` column).
    - ``steps_per_epoch()``: training batches per epoch, known without loading the data (``lr-plot``; without it,
      ``lr-plot`` sets the data up and counts them).
    - an init argument ``batch_size``: what ``batch-size-find`` tunes.
    - ``class_counts``: after ``setup("fit")``, the training images per class (``model.class_weights: balanced``).
    """

    shape: tuple[int, int, int]
    classes: Sequence[str]


def check(data) -> None:
    """One message naming what a data module lacks of :class:`ImageData`, and what it is for."""
    name = f"{type(data).__module__}.{type(data).__qualname__}"
    needed = {
        "shape": "the (channels, height, width) of its images, which the net is built for",
        "classes": "its class names in label order, which size the model's output and name its predictions",
    }
    for attribute, purpose in needed.items():
        if not hasattr(data, attribute):
            raise ConfigError(f"the data module {name} has no {attribute!r}: {purpose} (project.data.ImageData).")
    shape, classes = data.shape, data.classes
    if not (isinstance(shape, Sequence) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise ConfigError(f"the data module {name} has shape={shape!r}: give (channels, height, width), three positive "
                          "ints (project.data.ImageData).")  # fmt: skip
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) < 2:
        raise ConfigError(f"the data module {name} has classes={classes!r}: give two or more class names, in label "
                          "order (project.data.ImageData).")  # fmt: skip


class _SlicedBatchSampler(BatchSampler):
    """Draws the sampler's order for the whole epoch at once and yields it in tensor slices; the stock
    BatchSampler builds each batch with one Python call per index. Keeps BatchSampler's signature, so that
    Lightning can rebuild it around its DistributedSampler under DDP (Lightning 2.6 re-instantiates a custom batch
    sampler from its constructor's arguments: issue 20272)."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.as_tensor(list(self.sampler))
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        yield from order[:stop].split(self.batch_size)


class _EpochShuffle(RandomSampler):
    """A new order every epoch, drawn from ``(seed, epoch)`` alone (Lightning calls ``set_epoch``): a resumed run gets
    the order the uninterrupted one had, whatever else has drawn from the global RNG since. Under DDP, Lightning
    replaces it with a DistributedSampler, which shuffles by seed and epoch in the same way."""

    def __init__(self, data: Dataset, seed: int):
        super().__init__(data)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(
            len(self.data_source), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()


class _BalancedEpochSample(Sampler[int]):
    """As many images an epoch as the split holds, drawn with replacement so that every class is drawn as often
    (each image's chance the inverse of its class's size), from ``(seed, epoch)`` alone as :class:`_EpochShuffle`: a
    resumed run draws what the uninterrupted one drew. Under DDP, Lightning shards it (its DistributedSamplerWrapper,
    which hands ``set_epoch`` on), every process drawing the same order."""

    def __init__(self, labels: torch.Tensor, seed: int):
        counts = torch.bincount(labels.cpu())
        self.weights = 1.0 / counts[labels.cpu()].double()
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()


class _EvaluationBatches(_SlicedBatchSampler):
    """The batches of a validation, test or prediction: under DDP, each process takes every world-size-th image and
    no image twice. Lightning rebuilds the batch sampler around a DistributedSampler, which repeats images until the
    processes have as many (PyTorch issue 25162, Lightning issue 7929): their metrics would count those twice. Here
    that sampler becomes Lightning's own UnrepeatedDistributedSampler (which Lightning uses for predict): the processes
    may differ by one image, which evaluation allows (no gradients to reduce)."""

    def __init__(self, sampler, batch_size: int, drop_last: bool):
        if isinstance(sampler, DistributedSampler) and not isinstance(sampler, UnrepeatedDistributedSampler):
            sampler = UnrepeatedDistributedSampler(sampler.dataset, num_replicas=sampler.num_replicas,
                                                   rank=sampler.rank, shuffle=False)  # fmt: skip
        super().__init__(sampler, batch_size, drop_last)


def _key(seed: int, name: str) -> float:
    """A number in [0, 1) drawn from a seed and an image's name alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") / 2**64


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


class ImageDataModule(LightningDataModule):
    """Any :class:`~project.data.sources.Source` (a built-in dataset by name: ``mnist``, ``fashion_mnist``,
    ``cifar10``; :class:`~project.data.sources.ImageFolder`; :class:`~project.data.sources.MapDataset`), held as
    ``uint8`` tensors and served in whole batches.

    The splits a source has of its own are used as they are; the others are carved from its train split: ``val_size``
    images for validation and, for a source without a test split, ``test_size`` for test (counts or fractions). The
    carving follows each image's name where the source gives one (a folder's paths: adding or removing files moves no
    other image between the splits), otherwise a permutation seeded by ``split_seed``. The mean and std are the
    source's where it knows them, otherwise measured on the train split.

    Training batches can be augmented as a whole on the device: ``crop_padding`` (a random crop after zero padding),
    ``hflip``, ``random_erasing`` (the probability that an image gets a box of its train split's mean colour), and
    mixup and cutmix (torchvision's ``MixUp`` and ``CutMix``, Beta(``alpha``, ``alpha``) mixing, one of the two at
    random per batch when both are on), which turn the labels into soft targets ``(N, num_classes)``. All off at 0.
    Batches reach the device as ``uint8`` (floats in [0, 1] once erased or mixed): the model normalises them.
    ``balanced`` draws each training epoch with replacement so that every class comes as often (a run whose classes
    differ in size by more than 10x says so when it starts). ``folds`` and ``fold``: k-fold cross-validation (``compare
    --folds``): the train split less the test images (``test_size``, the same for every fold; ``val_size`` is unused)
    is cut into ``folds`` parts in the carving order, and part ``fold`` validates while the others train.

    ``predict`` labels the test split, or with ``predict_files`` (files, folders, glob patterns) those images, resized
    to the training size. ``positive_class`` turns the task into one-vs-rest binary classification. ``on_device`` keeps
    the splits in the accelerator's memory (60,000 28x28 images take 47 MB), so that a batch is one slice there and no
    step waits for a host-to-device copy. Arguments without a default here take theirs from ``configs/default.yaml``.
    """

    def __init__(
        self,
        source: Source | BuiltinName,
        batch_size: int,
        data_dir: str = "data",
        val_size: int | float = 5000,
        test_size: int | float = 0.1,
        eval_batch_size: int = 1000,
        crop_padding: int = 0,
        hflip: bool = False,
        positive_class: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        on_device: bool = False,
        predict_files: str | list[str] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        random_erasing: float = 0.0,
        balanced: bool = False,
        folds: int | None = None,
        fold: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"data.batch_size ({batch_size}) and data.eval_batch_size must be at least 1.")
        if min(crop_padding, num_workers) < 0:
            raise ConfigError("data.crop_padding and data.num_workers cannot be negative.")
        if on_device and num_workers:
            raise ConfigError("data.on_device serves batches from the accelerator's memory: set data.num_workers to 0.")
        for key, size in (("val_size", val_size), ("test_size", test_size)):
            if not ((isinstance(size, int) and size >= 1) or (isinstance(size, float) and 0 < size < 1)):
                raise ConfigError(
                    f"data.{key}={size} cannot split the train set: give a count of images (1 or more) "
                    "or a fraction between 0 and 1."
                )
        if (folds is not None and not (folds >= 2 and 0 <= fold < folds)) or (folds is None and fold):
            raise ConfigError(f"data.folds={folds}, data.fold={fold}: give 2 folds or more, and a fold in 0..folds-1.")
        if min(mixup_alpha, cutmix_alpha) < 0 or not 0 <= random_erasing <= 1:
            raise ConfigError("data.mixup_alpha and data.cutmix_alpha cannot be negative; data.random_erasing is a "
                              "probability, in [0, 1].")  # fmt: skip
        self.source = Builtin(source) if isinstance(source, str) else source
        self.title, self.shape, self.all_classes = self.source.title, tuple(self.source.shape), self.source.classes
        self.mean, self.std = self.source.mean, self.source.std  # None: measured on the train split in setup
        if positive_class is not None and not 0 <= positive_class < len(self.all_classes):
            raise ConfigError(
                f"data.positive_class={positive_class} is not a class of {self.title} (0..{len(self.all_classes) - 1})."
            )
        if self.source.multilabel and (positive_class is not None or balanced or mixup_alpha or cutmix_alpha):
            raise ConfigError(
                f"{self.source.title} is multi-label: data.positive_class, data.balanced, data.mixup_alpha and "
                "data.cutmix_alpha are for one class an image (mixup's and cutmix's torchvision transforms take class "
                "indices); leave them unset."
            )
        from torchvision.transforms import v2

        mixes = [mix(alpha=alpha, num_classes=self.num_classes)
                 for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]  # fmt: skip
        self.mix = v2.RandomChoice(mixes) if len(mixes) == 2 else mixes[0] if mixes else None
        # the run's seed (seed_everything has set it by now): another seed, another order
        self.shuffle_seed = torch.initial_seed()
        self.train_set = self.val_set = self.test_set = self.predict_set = None
        self.test_paths: list | None = None  # the test images' files, in test_set's order, where they are files
        self.predict_paths: list | None = None  # the files of predict_set's images, where they are files

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        """Whether an image has any number of the classes (labels as 0/1 rows): the source's."""
        return bool(self.source.multilabel)

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (after ``setup("fit")``)."""
        return class_counts(self.train_set.y.cpu(), self.num_classes).tolist()

    @property
    def classes(self) -> tuple[str, ...]:
        if self.hparams.positive_class is None:
            return tuple(self.all_classes)
        positive = self.all_classes[self.hparams.positive_class]
        return (f"not {positive}", positive)

    def _carve(self, n: int, has_val: bool, has_test: bool) -> tuple[int, int]:
        """How many images of a train pool of ``n`` go to validation and to test (none for a split with its own)."""
        sizes = []
        for own, size in ((has_val, self.hparams.val_size), (has_test, self.hparams.test_size)):
            sizes.append(0 if own else size if isinstance(size, int) else round(size * n))
        return sizes[0], sizes[1]

    def steps_per_epoch(self) -> int:
        """Training batches per epoch, known without decoding an image."""
        n = self.source.size()
        n_val, n_test = self._carve(n, "val" in self.source.splits, "test" in self.source.splits)
        if self.hparams.folds:
            n_val = (n - n_test) // self.hparams.folds
        return (n - n_val - n_test) // self.hparams.batch_size

    def fingerprint(self) -> dict:
        """What identifies the data this module serves (``run.json`` records it)."""
        return self.source.fingerprint(Path(self.hparams.data_dir))

    def _predicting_files(self) -> bool:
        return (
            self.hparams.predict_files is not None and self.trainer is not None and self.trainer.state.fn == "predict"
        )

    def prepare_data(self) -> None:
        """Once per node (Lightning calls it on local rank 0 only): the source's files in place and its cache built;
        nothing when ``predict`` labels ``predict_files``, which the checkpoint's classes and statistics describe."""
        if not self._predicting_files():
            self.source.prepare(Path(self.hparams.data_dir), self.hparams.num_workers)

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.hparams.predict_files is not None:
            if self.predict_set is None:
                self.predict_set = self._load_files()
            return
        own_test = "test" in self.source.splits
        if self.train_set is None and (stage in ("fit", "validate") or not own_test):
            self._setup_pool()
            if stage == "fit" and rank_zero_only.rank == 0:
                print(self.summary())
                counts = self.class_counts
                if min(counts) * 10 < max(counts) and not self.hparams.balanced:
                    small, large = counts.index(min(counts)), counts.index(max(counts))
                    print(f"note: the training classes differ in size by more than 10x ({self.classes[small]} "
                          f"{counts[small]:,}, {self.classes[large]} {counts[large]:,}): --data.balanced true draws "
                          "each class as often, --model.class_weights balanced weighs the loss by class.",
                          file=sys.stderr)  # fmt: skip
        if stage in ("test", "predict") and self.test_set is None:
            test = self._load("test")
            self.test_set, self.test_paths = test.set, test.paths
        if stage == "predict":
            self.predict_set, self.predict_paths = self.test_set, self.test_paths

    def summary(self) -> str:
        """How many images each split holds, and the train split per class: what a run is about to train on."""
        splits = (("train", self.train_set), ("validation", self.val_set), ("test", self.test_set))
        sizes = ", ".join(f"{name} {len(split):,}" for name, split in splits if split is not None)
        counts = self.class_counts
        per_class = ", ".join(f"{c} {n:,}" for c, n in zip(self.classes, counts, strict=True))
        if len(counts) > 12:
            per_class = f"{min(counts):,} to {max(counts):,} a class"
        test = "" if self.test_set is not None else ", test: the source's own"
        fold = f" (validating on fold {self.hparams.fold} of {self.hparams.folds})" if self.hparams.folds else ""
        return f"{self.title}: {self.num_classes} classes; {sizes} images{test}{fold}; train per class: {per_class}."

    def _load(self, split: str) -> Images:
        images = self.source.load(split, Path(self.hparams.data_dir), self.hparams.num_workers)
        if self.hparams.positive_class is not None:
            images.set.y = (images.set.y == self.hparams.positive_class).long()
        return images

    def _setup_pool(self) -> None:
        """The train split and the validation split, and where the source has none, the test split, carved from the
        source's train split; the mean and std measured on the train split where the source does not know them."""
        pool = self._load("train")
        if self.hparams.folds and "val" in self.source.splits:
            raise ConfigError(f"data.folds: {self.title} has a validation split of its own, and folds are cut from one "
                              "pool: move its images into the train split (a folder's val/ into train/).")  # fmt: skip
        val = self._load("val").set if "val" in self.source.splits else None
        carve_test = "test" not in self.source.splits
        # each image's place in the carving order from its name alone: adding or removing images moves no other image
        # between the splits (with fractions), so a run's test images stay out of a later run's training
        keys = None
        if pool.names is not None:
            keys = torch.tensor([_key(self.hparams.split_seed, name) for name in pool.names], dtype=torch.float64)
        self.train_set, self.val_set, test = self._split(pool.set, val, carve_test, keys)
        if carve_test:
            self.test_set = test
            self.test_paths = [pool.paths[i] for i in self._test_index.tolist()] if pool.paths else None
        processes = self.trainer.world_size if self.trainer is not None else 1
        share = -(-len(self.train_set) // processes)  # what DistributedSampler gives a process: rounded up
        if processes > 1 and share < self.hparams.batch_size:
            raise ConfigError(
                f"data.batch_size={self.hparams.batch_size} is more than the {share} training images each of the "
                f"{processes} processes gets of {len(self.train_set)}: no batch would train. Lower data.batch_size (it "
                "is per process)."
            )
        for name, split in (("validation", self.val_set), ("test", self.test_set)):
            if split is not None and not len(split):
                raise DataError(f"the {name} split of {self.title} holds no images that torchvision can decode.")
        if self.mean is None:
            sums = pool.sums[self._train_index] if pool.sums is not None else _sums(self.train_set.x)
            sums = sums.sum(0)
            pixels = len(self._train_index) * self.shape[1] * self.shape[2]
            mean = sums[0] / pixels
            std = (sums[1] / pixels - mean.square()).clamp(min=0).sqrt()
            self.mean = tuple(mean.tolist())
            self.std = tuple(torch.where(std > 0, std, torch.ones_like(std)).tolist())

    def _split(self, pool, val, carve_test: bool, keys: torch.Tensor | None) -> tuple:
        """Train, validation and (with ``carve_test``) test sets: ``val`` where the source has it, the rest carved
        from the train pool in an order seeded by ``split_seed``, or by the pool's ``keys`` (numbers in [0, 1), one
        per image): fractions then take the images whose keys fall in [0, val_size) and [val_size, val_size +
        test_size). Keeps the pool indices that train in ``_train_index`` and that test in ``_test_index``."""
        n = len(pool)
        folded = bool(self.hparams.folds)  # the folds validate: no val_size images are carved
        n_val, n_test = self._carve(n, val is not None or folded, not carve_test)
        if keys is None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.split_seed))
        else:
            order = keys.argsort()
            splits = ((val is not None or folded, self.hparams.val_size), (not carve_test, self.hparams.test_size))
            if all(own or isinstance(size, float) for own, size in splits):
                low, counts = 0.0, []
                for own, size in splits:
                    counts.append(0 if own else int(((keys >= low) & (keys < low + size)).sum()))
                    low += 0 if own else size
                n_val, n_test = counts
        sizes = f"data.val_size={self.hparams.val_size}" + (
            f" and data.test_size={self.hparams.test_size} leave" if carve_test else " leaves"
        )
        for lacking, none in (("validation", val is None and not folded and n_val < 1),
                              ("test", carve_test and n_test < 1), ("training", n_val + n_test >= n)):  # fmt: skip
            if none:
                raise ConfigError(f"{sizes} no {lacking} images: the {self.title} train set has {n}.")
        if n - n_val - n_test < self.hparams.batch_size:  # drop_last: not one training batch
            raise ConfigError(
                f"data.batch_size={self.hparams.batch_size} is more than the {n - n_val - n_test} training images that "
                f"{sizes} of the {self.title} train set: no batch would train. Lower one."
            )
        self._train_index, self._test_index = order[n_val + n_test :], order[n_val : n_val + n_test]
        val_index = order[:n_val]
        if folded:  # the test images as above; the rest cut into folds, one of which validates
            parts = order[n_test:].tensor_split(self.hparams.folds)
            val_index = parts[self.hparams.fold]
            self._train_index = torch.cat([p for i, p in enumerate(parts) if i != self.hparams.fold])
            if min(len(p) for p in parts) < 1 or len(self._train_index) < self.hparams.batch_size:
                raise ConfigError(
                    f"data.folds={self.hparams.folds} leaves too few images a fold ({len(parts[-1])}) of the "
                    f"{self.title} train set for data.batch_size={self.hparams.batch_size}."
                )
        if val is None:
            val = pool.subset(val_index)
        test = pool.subset(self._test_index) if carve_test else None
        return pool.subset(self._train_index), val, test

    def _load_files(self) -> Tensors:
        files = folders.expand([self.hparams.predict_files] if isinstance(self.hparams.predict_files, str)
                               else list(self.hparams.predict_files))  # fmt: skip
        c, h, w = self.shape
        images, _, _, ok = caches.decode_all(folders.Decoded(files, (h, w), c), self.shape, self.hparams.num_workers,
                                             keep=True)  # fmt: skip
        folders.warn_skipped([f for f, good in zip(files, ok.tolist(), strict=True) if not good], len(files))
        if not ok.any():
            raise DataError(f"none of the {len(files)} files of data.predict_files is an image torchvision can decode.")
        self.predict_paths = [f for f, good in zip(files, ok.tolist(), strict=True) if good]
        return Tensors(images[ok], torch.full((int(ok.sum()),), -1))

    def train_dataloader(self) -> DataLoader:
        # drop_last: a final batch of one image would break BatchNorm
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.hparams.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, self.hparams.eval_batch_size)

    def _loader(self, data, batch_size: int, shuffle: bool = False, drop_last: bool = False):
        workers = self.hparams.num_workers
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.hparams.on_device and isinstance(data, Tensors):
            data.x, data.y = data.x.to(device), data.y.to(device)  # once: a no-op when already there
        if shuffle and self.hparams.balanced:
            order = _BalancedEpochSample(data.y, self.shuffle_seed)
        else:
            order = _EpochShuffle(data, self.shuffle_seed) if shuffle else SequentialSampler(data)
        return DataLoader(
            data,
            batch_sampler=(_SlicedBatchSampler if shuffle else _EvaluationBatches)(order, batch_size, drop_last),
            collate_fn=_batch_as_is,
            # its own generator: creating an iterator then draws nothing from the global RNG (see _EpochShuffle)
            generator=torch.Generator().manual_seed(self.shuffle_seed),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda" and not self.hparams.on_device,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # not the model summary's example input, a float image already; and only training batches are augmented
        if self.trainer is None or not self.trainer.training or not isinstance(batch, tuple | list):
            return batch
        x, y = batch
        h = self.hparams
        if h.crop_padding:
            x = random_crop(x, h.crop_padding)
        if h.hflip:
            x = random_hflip(x)
        if h.random_erasing or self.mix is not None:
            x = x.float().div_(255) if x.dtype == torch.uint8 else x  # [0, 1]: torchvision's convention for floats
            if h.random_erasing:  # the mean colour, which normalisation makes 0, as torchvision's on normalised images
                x = random_erasing(x, h.random_erasing, torch.tensor(self.mean, device=x.device))
            if self.mix is not None:
                x, y = self.mix(x, y)
        return x, y


def _sums(x: torch.Tensor) -> torch.Tensor:
    """Each image's per-channel sum and sum of squares (float64, in 0..1 units), for a source that gives none."""
    pixels = x.flatten(2).double().div_(255)
    return torch.stack([pixels.sum(2), pixels.square().sum(2)], 1)
