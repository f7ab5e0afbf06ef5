import typing
from types import SimpleNamespace

import pytest
import torch
from conftest import OFFLINE, ROOT, invoke, write_idx

from project.data import DATASETS, Builtin, ImageDataModule
from project.data.augment import random_crop, random_hflip
from project.data.datamodule import BuiltinName
from project.errors import ConfigError, DataError
from project.module import Normalize


def setup(dm: ImageDataModule, *stages: str) -> ImageDataModule:
    dm.prepare_data()
    for stage in stages:
        dm.setup(stage)
    return dm


def test_config_names_every_registered_dataset():
    assert set(typing.get_args(BuiltinName)) == set(DATASETS)


def test_fashion_mnist_split_and_test_set(fashion_dir):
    dm = setup(ImageDataModule("fashion_mnist", 256, str(fashion_dir), val_size=5000), "fit", "test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    assert dm.train_set.x.dtype == torch.uint8 and dm.train_set.x.shape[1:] == (1, 28, 28)
    # the split partitions the official train set: no image is in both
    train_keys = {bytes(x.numpy()) for x in dm.train_set.x[:2000]}
    assert not train_keys & {bytes(x.numpy()) for x in dm.val_set.x}
    assert torch.bincount(dm.test_set.y).tolist() == [1000] * 10  # the official test split
    # seeded: the same split every time, another with another seed
    again = setup(ImageDataModule("fashion_mnist", 256, str(fashion_dir), val_size=0.1), "fit")
    assert len(again.val_set) == 6000
    same = setup(ImageDataModule("fashion_mnist", 256, str(fashion_dir), val_size=0.1), "fit")
    other = setup(ImageDataModule("fashion_mnist", 256, str(fashion_dir), val_size=0.1, split_seed=1), "fit")
    assert torch.equal(same.val_set.y, again.val_set.y) and not torch.equal(other.val_set.y, again.val_set.y)


def test_batches_are_whole_uint8_tensors_that_the_model_normalises(fashion_dir):
    dm = setup(ImageDataModule("fashion_mnist", 512, str(fashion_dir)), "fit")
    dm.trainer = SimpleNamespace(training=False, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    loader = dm.train_dataloader()
    assert len(loader) == 55000 // 512  # drop_last
    x, y = next(iter(loader))
    assert x.dtype == torch.uint8 and x.shape == (512, 1, 28, 28) and y.shape == (512,)
    x, y = dm.on_after_batch_transfer((x, y), 0)
    assert x.dtype == torch.uint8  # normalised in the model, which keeps the statistics the data gives it
    normalize = Normalize(1)
    normalize.set(dm.mean, dm.std)
    z = normalize(x)
    assert z.dtype == torch.float32 and abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
    # floats are taken to be in [0, 1] (torchvision's convention): the same images, the same inputs to the net
    assert torch.allclose(normalize(x.float() / 255), z, atol=1e-5)
    # shuffled each epoch, by the epoch's number alone: the same epoch, the same order (a resumed run's)
    first = next(iter(loader))[1]
    assert torch.equal(next(iter(loader))[1], first)
    loader.batch_sampler.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], first)


def test_augmentation_only_on_training_batches(fashion_dir):
    dm = setup(ImageDataModule("fashion_mnist", 256, str(fashion_dir), crop_padding=4, hflip=True), "fit")
    batch = next(iter(dm.val_dataloader()))
    dm.trainer = SimpleNamespace(training=False)
    plain, _ = dm.on_after_batch_transfer(batch, 0)
    dm.trainer = SimpleNamespace(training=True)
    augmented, _ = dm.on_after_batch_transfer(batch, 0)
    assert plain.shape == augmented.shape
    assert not torch.equal(plain, augmented)


def test_random_crop_shifts_each_image_within_the_padding():
    torch.manual_seed(0)
    x = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    x[:, :, 4, 4] = 255  # one bright pixel per image
    out = random_crop(x, padding=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    positions = [tuple(torch.nonzero(img[0])[0].tolist()) for img in out if img.any()]
    assert all(2 <= r <= 6 and 2 <= c <= 6 for r, c in positions)
    assert len(set(positions)) > 10  # a different window per image
    assert (out[:, 0] == 255).sum(dim=(1, 2)).le(1).all()  # a crop, not a blur


def test_random_hflip_mirrors_about_half():
    torch.manual_seed(0)
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).reshape(2, 1, 2, 3).repeat(50, 1, 1, 1)
    out = random_hflip(x)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert torch.equal(mirrored | (out == x).flatten(1).all(1), torch.ones(100, dtype=torch.bool))
    assert 30 < mirrored.sum() < 70


def test_binary_one_vs_rest(fashion_dir):
    dm = setup(ImageDataModule("fashion_mnist", 256, str(fashion_dir), positive_class=9), "fit", "test")
    assert dm.num_classes == 2 and dm.classes == ("not Boot", "Boot")
    assert set(dm.test_set.y.tolist()) == {0, 1} and dm.test_set.y.sum() == 1000


def test_mnist_through_torchvision_from_idx_files(fake_mnist):
    dm = setup(ImageDataModule("mnist", 256, str(fake_mnist), val_size=100), "fit", "test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (500, 100, 200)
    assert dm.shape == (1, 28, 28) and dm.test_set.x.shape[1:] == (1, 28, 28)


def test_cifar10_through_torchvision_from_pickled_batches(fake_cifar10):
    dm = setup(ImageDataModule("cifar10", 256, str(fake_cifar10), val_size=50), "fit", "test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (450, 50, 100)
    x = dm.test_set.x
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8
    # channels-first, as written: the label's band of rows is bright in every channel
    label = dm.test_set.y[0].item()
    assert (x[0, :, label * 32 // 10, :] == 230).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_size": 0}, "cannot split"),
        ({"val_size": 1.5}, "cannot split"),
        ({"batch_size": 0}, "at least 1"),
        ({"positive_class": 10}, "not a class"),
    ],
)
def test_bad_settings_are_refused_at_once(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ImageDataModule("fashion_mnist", **{"batch_size": 256, **kwargs})


def test_val_size_larger_than_the_train_set(fake_mnist):
    dm = setup(ImageDataModule("mnist", 256, str(fake_mnist), val_size=600))
    with pytest.raises(ConfigError, match="leaves no training images: the MNIST train set has 600"):
        dm.setup("fit")


def test_missing_data_without_network_names_directory_files_and_remedies(tmp_path, monkeypatch):
    # every proxy pointing at a closed port: the download really runs and fails
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    logs = tmp_path / "logs"
    result = invoke(["fit", "--data.source=mnist", f"--data.data_dir={tmp_path}", "--model.net=project.models.MLP",
                     f"--trainer.logger.init_args.save_dir={logs}"])  # fmt: skip
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: MNIST is not in ")
    for part in (
        str(tmp_path / "MNIST" / "raw"),
        "train-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "downloading them failed",
        "connect to the internet",
        "Fashion-MNIST",
    ):
        assert part in message
    assert "Traceback" not in result.stderr
    assert not list(logs.glob("*/*"))  # a run that failed before writing anything leaves no empty directory


def test_missing_data_with_download_off(tmp_path):
    with pytest.raises(DataError, match=r"download is off .* place the files \(or their \.gz\) in"):
        ImageDataModule(Builtin("cifar10", download=False), 256, str(tmp_path)).prepare_data()


def test_local_gz_copy_is_used(tmp_path, fashion_dir):
    # .gz files dropped into the raw directory are decompressed and verified, as the Debian copy is
    import gzip

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in DATASETS["fashion_mnist"].md5:
        (raw / f"{name}.gz").write_bytes(
            gzip.compress((fashion_dir / "FashionMNIST" / "raw" / name).read_bytes(), compresslevel=1)
        )
    setup(ImageDataModule("fashion_mnist", 256, str(tmp_path)), "test")


def test_wrong_label_range_caught_at_setup(fake_mnist, monkeypatch):
    from conftest import md5

    raw = fake_mnist / "MNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", torch.full((200,), 12, dtype=torch.uint8).numpy())
    monkeypatch.setitem(DATASETS["mnist"].md5, "t10k-labels-idx1-ubyte", md5(raw / "t10k-labels-idx1-ubyte"))
    with pytest.raises(DataError, match=r"labels .* range over \[12, 12\]; expected classes 0..9"):
        setup(ImageDataModule("mnist", 256, str(fake_mnist)), "test")


def test_wrong_image_shape_caught_at_setup(fake_mnist, monkeypatch):
    from conftest import md5

    raw = fake_mnist / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", torch.zeros(200, 32, 32, dtype=torch.uint8).numpy())
    monkeypatch.setitem(DATASETS["mnist"].md5, "t10k-images-idx3-ubyte", md5(raw / "t10k-images-idx3-ubyte"))
    with pytest.raises(DataError, match=r"shape \(200, 1, 32, 32\).*expected uint8 images of shape \(N, 1, 28, 28\)"):
        setup(ImageDataModule("mnist", 256, str(fake_mnist)), "test")


def test_repo_data_dir_is_ignored_by_git():
    assert "/data/" in (ROOT / ".gitignore").read_text()


def test_on_device_serves_batches_from_the_trainers_device(fashion_dir):
    # the meta device stands in for a GPU: the splits move there once, batches are sliced there, nothing is pinned
    dm = setup(ImageDataModule("fashion_mnist", 256, str(fashion_dir), on_device=True), "fit")
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    loader = dm.train_dataloader()
    assert dm.train_set.x.is_meta and dm.train_set.y.is_meta and not loader.pin_memory
    x, y = next(iter(loader))
    assert x.is_meta and x.shape == (256, 1, 28, 28) and y.is_meta
    with pytest.raises(ConfigError, match=r"data\.on_device .* set data\.num_workers to 0"):
        ImageDataModule("fashion_mnist", 256, str(fashion_dir), on_device=True, num_workers=2)
