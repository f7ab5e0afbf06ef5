import hashlib
from collections.abc import Iterator
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from project.data import folder as folders
from project.data import registry
from project.data.augment import random_crop, random_erasing, random_hflip
from project.data.sets import Tensors
from project.errors import ConfigError, DataError

# the built-in datasets, and "folder": a folder of the user's images (data.folder)
DatasetName = Literal["mnist", "fashion_mnist", "cifar10", "folder"]


class _SlicedBatchSampler(BatchSampler):
    """Draws the sampler's order for the whole epoch at once and yields it in tensor slices; the stock
    BatchSampler builds each batch with one Python call per index. Keeps BatchSampler's signature, so that
    Lightning can rebuild it around its DistributedSampler under DDP."""

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


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def task(
    dataset: str, positive_class: int | None, folder: str | None, image_size: int | tuple[int, int], channels: int
) -> tuple[tuple[int, int, int], int]:
    """The image shape and the number of classes, known without decoding an image (a folder's from its names)."""
    if dataset == "folder":
        if folder is None or not str(folder).strip():
            raise ConfigError("data.dataset folder needs data.folder: the directory with one sub-folder per class.")
        return (channels, *_size(image_size)), 2 if positive_class is not None else len(folders.classes_of(folder))
    info = registry.DATASETS[dataset]
    return info.shape, 2 if positive_class is not None else len(info.classes)


def _key(seed: int, path) -> float:
    """A number in [0, 1) drawn from a seed and a path alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "big") / 2**64


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


class ImageDataModule(LightningDataModule):
    """MNIST, Fashion-MNIST, CIFAR-10 or a folder of images, held as ``uint8`` tensors and served in whole batches.

    Built-in datasets: the official train set is split (seeded by ``split_seed``) into train and validation; the
    official test set stays the test set. ``folder`` (``data.folder``): one sub-folder per class, either inside
    ``train/`` (with optional ``val/`` and ``test/``) or directly, decoded at ``image_size`` with ``channels``
    (1: grayscale, 3: RGB); what has no split folder of its own is carved from the train pool, ``val_size`` then
    ``test_size`` (counts or fractions); the mean and std are measured on the train split and kept in checkpoints.
    A folder larger than ``in_memory_max_mb`` decoded is read from disk by ``num_workers`` workers (see
    :mod:`project.data.folder`).

    Training batches can also be regularised as a whole on the device: ``random_erasing`` (the probability that an
    image gets a box of zeros), and mixup and cutmix (torchvision's ``MixUp`` and ``CutMix``, Beta(``alpha``, ``alpha``)
    mixing, one of the two at random per batch when both are on), which turn the labels into soft targets
    ``(N, num_classes)``. All off at 0.

    ``predict`` labels the test set, or with ``predict_files`` (files, folders, glob patterns) those images, resized
    to the training size. Batches reach the device as ``uint8``; augmentation (``crop_padding``, ``hflip``) and
    normalisation run there on the whole batch. ``positive_class`` turns the task into one-vs-rest binary
    classification. ``on_device`` keeps the splits in the accelerator's memory (60,000 28x28 images take 47 MB), so
    that a batch is one slice there and no step waits for a host-to-device copy. Arguments without a default here take
    theirs from ``configs/default.yaml``.
    """

    def __init__(
        self,
        dataset: DatasetName,
        batch_size: int,
        data_dir: str = "data",
        val_size: int | float = 5000,
        eval_batch_size: int = 1000,
        crop_padding: int = 0,
        hflip: bool = False,
        positive_class: int | None = None,
        num_workers: int = 0,
        download: bool = True,
        split_seed: int = 0,
        on_device: bool = False,
        folder: str | None = None,
        image_size: int | tuple[int, int] = 64,
        channels: Literal[1, 3] = 3,
        test_size: int | float = 0.1,
        in_memory_max_mb: int = 2048,
        predict_files: str | list[str] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        random_erasing: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"data.batch_size ({batch_size}) and data.eval_batch_size must be at least 1.")
        if min(crop_padding, num_workers, in_memory_max_mb) < 0:
            raise ConfigError("data.crop_padding, data.num_workers and data.in_memory_max_mb cannot be negative.")
        if on_device and num_workers:
            raise ConfigError("data.on_device serves batches from the accelerator's memory: set data.num_workers to 0.")
        for key, size in (("val_size", val_size), ("test_size", test_size)):
            if not ((isinstance(size, int) and size >= 1) or (isinstance(size, float) and 0 < size < 1)):
                raise ConfigError(
                    f"data.{key}={size} cannot split the train set: give a count of images (1 or more) "
                    "or a fraction between 0 and 1."
                )
        if min(mixup_alpha, cutmix_alpha) < 0 or not 0 <= random_erasing <= 1:
            raise ConfigError("data.mixup_alpha and data.cutmix_alpha cannot be negative; data.random_erasing is a "
                              "probability, in [0, 1].")  # fmt: skip
        if min(_size(image_size)) < 1:
            raise ConfigError(f"data.image_size={image_size}: give a size of 1 pixel or more (an int, or [H, W]).")
        if dataset != "folder" and folder is not None:
            raise ConfigError(f"data.folder is for data.dataset folder; {dataset} is a built-in dataset.")
        self.shape, _ = task(dataset, None, folder, image_size, channels)
        if dataset == "folder":
            self.title, self.all_classes = f"image folder {folder}", folders.classes_of(folder)
            self.mean = self.std = None  # measured on the train split in setup
        else:
            info = registry.DATASETS[dataset]
            self.title, self.all_classes, self.mean, self.std = info.title, info.classes, info.mean, info.std
        if positive_class is not None and not 0 <= positive_class < len(self.all_classes):
            raise ConfigError(
                f"data.positive_class={positive_class} is not a class of {self.title} (0..{len(self.all_classes) - 1})."
            )
        from torchvision.transforms import v2

        mixes = [mix(alpha=alpha, num_classes=self.num_classes)
                 for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]  # fmt: skip
        self.mix = v2.RandomChoice(mixes) if len(mixes) == 2 else mixes[0] if mixes else None
        # the run's seed (seed_everything has set it by now): another seed, another order
        self.shuffle_seed = torch.initial_seed()
        self.train_set = self.val_set = self.test_set = self.predict_set = None
        self.test_paths: list | None = None  # a folder's test images' files, in test_set's order
        self.predict_paths: list | None = None  # the files of predict_set's images, where they are files

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
        if self.hparams.dataset == "folder":
            splits = folders.scan(self.hparams.folder).splits
            n = len(splits["train"][0])
            n_val, n_test = self._carve(n, "val" in splits, "test" in splits)
        else:
            n = registry.DATASETS[self.hparams.dataset].train_size
            n_val, n_test = self._carve(n, False, True)
        return (n - n_val - n_test) // self.hparams.batch_size

    def prepare_data(self) -> None:
        """Once per node (Lightning calls it on local rank 0 only): the files in place, or a folder's cache built;
        nothing when ``predict`` labels ``predict_files``, which the checkpoint's classes and statistics describe."""
        h = self.hparams
        if h.predict_files is not None and self.trainer is not None and self.trainer.state.fn == "predict":
            return
        if h.dataset != "folder":
            registry.prepare(h.dataset, h.data_dir, h.download)
        else:
            folders.cache(h.folder, _size(h.image_size), h.channels, h.data_dir, h.in_memory_max_mb, h.num_workers)

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.hparams.predict_files is not None:
            if self.predict_set is None:
                self.predict_set = self._load_files()
            return
        if self.hparams.dataset == "folder":
            if self.train_set is None:
                self._setup_folder()
        elif stage in ("fit", "validate") and self.train_set is None:
            pool = Tensors(*self._relabel(*registry.load(self.hparams.dataset, self.hparams.data_dir, train=True)))
            self.train_set, self.val_set, _ = self._split(pool)
        elif stage in ("test", "predict") and self.test_set is None:
            x, y = registry.load(self.hparams.dataset, self.hparams.data_dir, train=False)
            self.test_set = Tensors(*self._relabel(x, y))
        if stage == "predict":
            self.predict_set, self.predict_paths = self.test_set, self.test_paths

    def _relabel(self, x, y: torch.Tensor) -> tuple:
        return x, y if self.hparams.positive_class is None else (y == self.hparams.positive_class).long()

    def _split(self, pool, val=None, test=None, carve_test: bool = False, keys: torch.Tensor | None = None) -> tuple:
        """Train, validation and (with ``carve_test``) test sets: the ones a split folder gave (``val``, ``test``),
        the rest carved from the train pool in an order seeded by ``split_seed``, or by the pool's ``keys`` (numbers
        in [0, 1), one per image): fractions then take the images whose keys fall in [0, val_size) and
        [val_size, val_size + test_size). Keeps the pool indices that train in ``_train_index``."""
        n = len(pool)
        n_val, n_test = self._carve(n, val is not None, not carve_test)
        if keys is None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.split_seed))
        else:
            order = keys.argsort()
            splits = ((val is not None, self.hparams.val_size), (not carve_test, self.hparams.test_size))
            if all(own or isinstance(size, float) for own, size in splits):
                low, counts = 0.0, []
                for own, size in splits:
                    counts.append(0 if own else int(((keys >= low) & (keys < low + size)).sum()))
                    low += 0 if own else size
                n_val, n_test = counts
        sizes = f"data.val_size={self.hparams.val_size}" + (
            f" and data.test_size={self.hparams.test_size} leave" if carve_test else " leaves"
        )
        for lacking, none in (("validation", val is None and n_val < 1), ("test", carve_test and n_test < 1),
                              ("training", n_val + n_test >= n)):  # fmt: skip
            if none:
                raise ConfigError(f"{sizes} no {lacking} images: the {self.title} train set has {n}.")
        if n - n_val - n_test < self.hparams.batch_size:  # drop_last: not one training batch
            raise ConfigError(
                f"data.batch_size={self.hparams.batch_size} is more than the {n - n_val - n_test} training images that "
                f"{sizes} of the {self.title} train set: no batch would train. Lower one."
            )
        self._train_index, self._test_index = order[n_val + n_test :], order[n_val : n_val + n_test]
        if val is None:
            val = pool.subset(order[:n_val])
        if carve_test:
            test = pool.subset(order[n_val : n_val + n_test])
        return pool.subset(self._train_index), val, test

    def _setup_folder(self) -> None:
        h = self.hparams
        data = folders.load(h.folder, _size(h.image_size), h.channels, h.data_dir, h.in_memory_max_mb, h.num_workers)
        for split in data.sets.values():
            split.y = self._relabel(None, split.y)[1]
        test = data.sets.get("test")
        # each image's place in the carving order from its path alone: adding or removing files moves no other image
        # between the splits (with fractions), so a run's test images stay out of a later run's training
        keys = torch.tensor([_key(h.split_seed, p.relative_to(data.layout.root)) for p in data.paths["train"]],
                            dtype=torch.float64)  # fmt: skip
        self.train_set, self.val_set, self.test_set = self._split(
            data.sets["train"], data.sets.get("val"), test, carve_test=test is None, keys=keys
        )
        self.test_paths = data.paths["test"] if test is not None else [data.paths["train"][i] for i in self._test_index]
        for name, split in (("validation", self.val_set), ("test", self.test_set)):
            if not len(split):
                raise DataError(f"the {name} split of {self.title} holds no images that torchvision can decode.")
        if self.mean is None:  # not restored from a checkpoint: measured on this train split
            sums = data.sums["train"][self._train_index].sum(0)
            pixels = len(self._train_index) * self.shape[1] * self.shape[2]
            mean = sums[0] / pixels
            std = (sums[1] / pixels - mean.square()).clamp(min=0).sqrt()
            self.mean = tuple(mean.tolist())
            self.std = tuple(torch.where(std > 0, std, torch.ones_like(std)).tolist())

    def _load_files(self) -> Tensors:
        files = folders.expand([self.hparams.predict_files] if isinstance(self.hparams.predict_files, str)
                               else list(self.hparams.predict_files))  # fmt: skip
        images, _, ok = folders.decode_all(files, self.shape[1:], self.shape[0], self.hparams.num_workers, keep=True)
        folders.warn_skipped([f for f, good in zip(files, ok.tolist(), strict=True) if not good], len(files))
        if not ok.any():
            raise DataError(f"none of the {len(files)} files of data.predict_files is an image torchvision can decode.")
        self.predict_paths = [f for f, good in zip(files, ok.tolist(), strict=True) if good]
        return Tensors(images[ok], torch.full((int(ok.sum()),), -1))

    def state_dict(self) -> dict:
        """Kept in checkpoints, so that test, predict and export normalise as training did and name its classes."""
        return {"mean": list(self.mean or ()), "std": list(self.std or ()), "classes": list(self.all_classes)}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("classes", self.all_classes)) != list(self.all_classes):
            raise ConfigError(
                f"the checkpoint was trained on the classes {', '.join(state['classes'])}, and {self.title} has "
                f"{', '.join(self.all_classes)}: use the data the run was trained on."
            )
        if state.get("mean"):
            self.mean, self.std = tuple(state["mean"]), tuple(state["std"])
            self.__dict__.pop("_stats", None)

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
        order = _EpochShuffle(data, self.shuffle_seed) if shuffle else SequentialSampler(data)
        return DataLoader(
            data,
            batch_sampler=_SlicedBatchSampler(order, batch_size, drop_last),
            collate_fn=_batch_as_is,
            # its own generator: creating an iterator then draws nothing from the global RNG (see _EpochShuffle)
            generator=torch.Generator().manual_seed(self.shuffle_seed),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda" and not self.hparams.on_device,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, tuple | list):  # the model summary's example input, already a float image
            return batch
        x, y = batch
        if self.trainer is None or not self.trainer.training:
            return self.normalize(x), y
        if self.hparams.crop_padding:
            x = random_crop(x, self.hparams.crop_padding)
        if self.hparams.hflip:
            x = random_hflip(x)
        x = self.normalize(x)
        if self.hparams.random_erasing:
            x = random_erasing(x, self.hparams.random_erasing)
        if self.mix is not None:
            x, y = self.mix(x, y)
        return x, y

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8`` images to floats with the training data's mean 0 and std 1 per channel."""
        if self.mean is None:  # a folder's predict without a checkpoint, which would have brought them
            self._setup_folder()
        if getattr(self, "_stats", (None,))[0] != x.device:  # copied to the device once, not every batch
            stats = torch.tensor([self.mean, self.std], device=x.device) * 255
            self._stats = (x.device, *stats.view(2, 1, -1, 1, 1))
        _, mean, std = self._stats
        return (x.float() - mean) / std
