from collections.abc import Iterator
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from project.data import registry
from project.data.augment import random_crop, random_hflip
from project.errors import ConfigError

DatasetName = Literal["mnist", "fashion_mnist", "cifar10"]


class _Tensors(Dataset):
    """Images and labels held in memory; the DataLoader asks for whole batches through ``__getitems__``,
    so a batch costs one index operation instead of one Python call and one collate per image."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # to the data's device without waiting (data.on_device): a blocking copy would drain the GPU's queue each step
        idx = torch.as_tensor(indices).to(self.y.device, non_blocking=True)
        return self.x[idx], self.y[idx]


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


def task(dataset: str, positive_class: int | None) -> tuple[tuple[int, int, int], int]:
    """The image shape and the number of classes of a dataset, known without reading it."""
    info = registry.DATASETS[dataset]
    return info.shape, 2 if positive_class is not None else len(info.classes)


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


class ImageDataModule(LightningDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10, held as ``uint8`` tensors and served in whole batches.

    The official train set is split (seeded by ``split_seed``) into train and validation; the official
    test set stays the test set and is what ``predict`` labels. Batches reach the device as ``uint8``;
    augmentation (``crop_padding``, ``hflip``) and normalisation with the dataset's mean/std run there on
    the whole batch. ``positive_class`` turns the task into one-vs-rest binary classification.
    ``on_device`` keeps the splits in the accelerator's memory (60,000 28x28 images take 47 MB), so that a batch
    is one slice there and no step waits for a host-to-device copy. Arguments without a default here take theirs
    from ``configs/default.yaml``.
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
    ):
        super().__init__()
        self.save_hyperparameters()
        self.info = registry.DATASETS[dataset]
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"data.batch_size ({batch_size}) and data.eval_batch_size must be at least 1.")
        if crop_padding < 0 or num_workers < 0:
            raise ConfigError("data.crop_padding and data.num_workers cannot be negative.")
        if on_device and num_workers:
            raise ConfigError("data.on_device serves batches from the accelerator's memory: set data.num_workers to 0.")
        if not ((isinstance(val_size, int) and val_size >= 1) or (isinstance(val_size, float) and 0 < val_size < 1)):
            raise ConfigError(
                f"data.val_size={val_size} cannot split the train set: give a count of images (1 or more) "
                "or a fraction between 0 and 1."
            )
        if positive_class is not None and not 0 <= positive_class < len(self.info.classes):
            raise ConfigError(
                f"data.positive_class={positive_class} is not a class of {self.info.title} "
                f"(0..{len(self.info.classes) - 1})."
            )
        # the run's seed (seed_everything has set it by now): another seed, another order
        self.shuffle_seed = torch.initial_seed()
        self.train_set: _Tensors | None = None
        self.val_set: _Tensors | None = None
        self.test_set: _Tensors | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.info.shape

    @property
    def num_classes(self) -> int:
        return task(self.hparams.dataset, self.hparams.positive_class)[1]

    @property
    def classes(self) -> tuple[str, ...]:
        if self.hparams.positive_class is None:
            return self.info.classes
        positive = self.info.classes[self.hparams.positive_class]
        return (f"not {positive}", positive)

    def steps_per_epoch(self) -> int:
        """Training batches per epoch of the official data, known without reading it."""
        size = self.hparams.val_size
        n_val = size if isinstance(size, int) else round(size * self.info.train_size)
        return (self.info.train_size - n_val) // self.hparams.batch_size

    def prepare_data(self) -> None:
        registry.prepare(self.hparams.dataset, self.hparams.data_dir, self.hparams.download)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_set is None:
            x, y = self._load(train=True)
            size = self.hparams.val_size
            n_val = size if isinstance(size, int) else round(size * len(y))
            if not 0 < n_val < len(y):
                raise ConfigError(
                    f"data.val_size={size} leaves no {'validation' if n_val < 1 else 'training'} images: "
                    f"the {self.info.title} train set has {len(y)}."
                )
            if len(y) - n_val < self.hparams.batch_size:  # drop_last: not one training batch
                raise ConfigError(
                    f"data.batch_size={self.hparams.batch_size} is more than the {len(y) - n_val} training images that "
                    f"data.val_size={size} leaves of the {self.info.title} train set: no batch would train. Lower one."
                )
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.split_seed))
            self.val_set = _Tensors(x[order[:n_val]], y[order[:n_val]])
            self.train_set = _Tensors(x[order[n_val:]], y[order[n_val:]])
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = _Tensors(*self._load(train=False))

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = registry.load(self.hparams.dataset, self.hparams.data_dir, train)
        if self.hparams.positive_class is not None:
            y = (y == self.hparams.positive_class).long()
        return x, y

    def train_dataloader(self) -> DataLoader:
        # drop_last: a final batch of one image would break BatchNorm
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.hparams.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def _loader(self, data: _Tensors | None, batch_size: int, shuffle: bool = False, drop_last: bool = False):
        workers = self.hparams.num_workers
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.hparams.on_device:
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
        if self.trainer is not None and self.trainer.training:
            if self.hparams.crop_padding:
                x = random_crop(x, self.hparams.crop_padding)
            if self.hparams.hflip:
                x = random_hflip(x)
        return self.normalize(x), y

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8`` images to floats with the dataset's mean 0 and std 1 per channel."""
        if getattr(self, "_stats", (None,))[0] != x.device:  # copied to the device once, not every batch
            stats = torch.tensor([self.info.mean, self.info.std], device=x.device) * 255
            self._stats = (x.device, *stats.view(2, 1, -1, 1, 1))
        _, mean, std = self._stats
        return (x.float() - mean) / std
