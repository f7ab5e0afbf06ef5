"""A user's folder of images: layouts, decoding, the cache, streaming, bad folders, training and predicting on it.
The images are real Fashion-MNIST images written as PNG and JPEG files (conftest.write_image_folder)."""

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FOLDER_CLASSES, folder_fit, invoke, run, write_image_folder

from project.data import ImageDataModule, ImageFolder
from project.data import cache as caches
from project.data import folder as folders
from project.errors import DataError
from project.images import decode
from project.module import ImageClassifier

CLASSES = tuple(sorted(FOLDER_CLASSES))  # class names are the folder names, sorted


def folder_data(root: Path, cache: Path, **kwargs) -> ImageDataModule:
    source = {
        "image_size": 28,
        **{k: kwargs.pop(k) for k in ("image_size", "channels", "in_memory_max_mb") if k in kwargs},
    }
    kwargs = {"val_size": 0.1, "test_size": 0.1, **kwargs}
    dm = ImageDataModule(ImageFolder(str(root), **source), kwargs.pop("batch_size", 32), str(cache), **kwargs)
    dm.setup("fit")
    dm.setup("test")
    return dm


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_class_folders_split_by_seeded_fractions(image_folder, tmp_path):
    dm = folder_data(image_folder, tmp_path)
    assert dm.classes == CLASSES and dm.shape == (3, 28, 28) and dm.num_classes == 3
    # fractions of the folder by each file's path: about 10% each (binomial: 30 +- 5)
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sum(sizes) == 300 and 15 <= sizes[1] <= 45 and 15 <= sizes[2] <= 45
    assert dm.train_set.x.dtype == torch.uint8 and dm.train_set.x.shape[1:] == (3, 28, 28)
    # the three splits partition the 300 images
    keys = [{bytes(x.numpy()) for x in s.x} for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert sum(map(len, keys)) == len(set().union(*keys)) == 300
    assert torch.bincount(torch.cat([dm.train_set.y, dm.val_set.y, dm.test_set.y])).tolist() == [100, 100, 100]
    again, other = folder_data(image_folder, tmp_path), folder_data(image_folder, tmp_path, split_seed=1)
    assert torch.equal(again.val_set.x, dm.val_set.x) and not torch.equal(other.val_set.x, dm.val_set.x)
    # the mean and std are the train split's, per channel
    pixels = dm.train_set.x.double().div(255).transpose(0, 1).flatten(1)
    assert torch.allclose(torch.tensor(dm.mean, dtype=torch.float64), pixels.mean(1), atol=1e-6)
    assert torch.allclose(torch.tensor(dm.std, dtype=torch.float64), pixels.std(1, correction=0), atol=1e-6)


def test_a_changed_folder_moves_no_image_between_splits(fashion_dir, tmp_path):
    root = write_image_folder(tmp_path / "images", fashion_dir, 60)

    def splits() -> dict[str, set[bytes]]:
        dm = folder_data(root, tmp_path / "cache", val_size=0.2, test_size=0.2, image_size=12)
        return {name: {bytes(x.numpy()) for x in getattr(dm, f"{name}_set").x} for name in ("train", "val", "test")}

    before = splits()
    for name in ("0001.png", "0002.png", "0007.png"):  # three removed, ten added
        (root / "bag" / name).unlink()
    write_image_folder(tmp_path / "more", fashion_dir, 70)
    for i in range(60, 70):
        shutil.copy(next((tmp_path / "more" / "sneaker").glob(f"{i:04d}.*")), root / "sneaker" / f"new{i}.png")
    after = splits()
    for name, images in before.items():
        for other in ("train", "val", "test"):
            if other != name:
                assert not images & after[other], (name, other)


def test_train_val_test_folders_are_the_splits(fashion_dir, tmp_path):
    root = write_image_folder(tmp_path / "images", fashion_dir, 20, ("train", "train", "val", "test"))
    dm = folder_data(root, tmp_path, val_size=5, batch_size=8)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (120, 60, 60)
    shutil.rmtree(root / "val")  # no val/: carved from train/, test/ stays
    dm = folder_data(root, tmp_path, val_size=5, batch_size=8)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (115, 5, 60)


def test_images_are_converted_and_resized_as_configured(image_folder, tmp_path):
    rgb_small = image_folder / "bag" / "0005.png"  # i % 5 == 0: 40x36; i % 3 != 0: gray
    assert decode(rgb_small, (40, 36), 1).shape == (1, 40, 36)
    gray = decode(rgb_small, (28, 28), 3)
    assert gray.shape == (3, 28, 28) and torch.equal(gray[0], gray[1])  # a gray file as RGB: equal channels
    tinted = decode(image_folder / "bag" / "0003.png", (28, 28), 3)  # i % 3 == 0: RGB
    assert not torch.equal(tinted[0], tinted[2])
    dm = folder_data(image_folder, tmp_path, image_size=[20, 24], channels=1)
    assert dm.shape == (1, 20, 24) and dm.train_set.x.shape[1:] == (1, 20, 24) and len(dm.mean) == 1


def test_cache_is_used_until_a_file_changes(fashion_dir, tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "images", fashion_dir, 20)
    decoded = []
    real = caches.decode_all
    monkeypatch.setattr(caches, "decode_all", lambda files, *a, **k: decoded.append(len(files)) or real(files, *a, **k))
    first = folder_data(root, tmp_path / "cache")
    assert decoded == [60] and len(list((tmp_path / "cache" / "folders").glob("*.pt"))) == 1
    again = folder_data(root, tmp_path / "cache")
    assert decoded == [60] and torch.equal(again.train_set.x, first.train_set.x)  # from the cache
    shutil.copy(root / "bag" / "0001.png", root / "bag" / "extra.png")
    grown = folder_data(root, tmp_path / "cache")
    assert decoded == [60, 61] and len(grown.train_set) + len(grown.val_set) + len(grown.test_set) == 61
    path = root / "bag" / "0002.png"
    stat = path.stat()
    write_image_folder(tmp_path / "other", fashion_dir, 21)
    shutil.copy(tmp_path / "other" / "trouser" / "0019.png", path)  # same name, other content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = folder_data(root, tmp_path / "cache")
    total = [sum(int(s.x.long().sum()) for s in (d.train_set, d.val_set, d.test_set)) for d in (grown, changed)]
    assert decoded == [60, 61, 61] and total[0] != total[1]
    # another size or channel count is another cache, and a damaged cache file is rebuilt, not trusted
    folder_data(root, tmp_path / "cache", image_size=24)
    assert decoded[-1] == 61 and len(decoded) == 4
    for cache in (tmp_path / "cache" / "folders").glob("*.pt"):
        cache.write_bytes(b"garbage")
    folder_data(root, tmp_path / "cache")
    assert len(decoded) == 5


def test_streamed_and_in_memory_serve_the_same_batches(image_folder, tmp_path):
    memory = folder_data(image_folder, tmp_path, crop_padding=2)
    disk = folder_data(image_folder, tmp_path, crop_padding=2, in_memory_max_mb=0)
    assert isinstance(memory.train_set, folders.Tensors) and isinstance(disk.train_set, folders.Files)
    assert memory.mean == disk.mean and memory.std == disk.std
    for a, b in (
        (memory.train_dataloader(), disk.train_dataloader()),
        (memory.val_dataloader(), disk.val_dataloader()),
    ):
        batches = list(zip(a, b, strict=True))
        assert len(batches) >= 1
        for (xa, ya), (xb, yb) in batches:
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_streamed_folder_trains_with_workers(image_folder, tmp_path):
    result = invoke(folder_fit(tmp_path, image_folder, "--data.source.in_memory_max_mb=0", "--data.num_workers=2"))
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "logs" / "folder" / "version_0" / "checkpoints").glob("best-*.ckpt"))


@pytest.mark.parametrize("net", ["SoftmaxRegression", "MLP", "LeNet", "ConvNet", "ResNet"])
def test_every_model_trains_on_a_folder(image_folder, tmp_path, net):
    # RGB, not square, with the crop and flip augmentations
    args = [f"--model.net=project.models.{net}", "--data.source.image_size=[30,36]", "--data.crop_padding=2"]
    result = invoke(folder_fit(tmp_path, image_folder, *args, "--data.hflip=true", "--trainer.limit_train_batches=2"))
    assert result.returncode == 0, result.stderr


def test_training_learns_the_folder_classes(image_folder, tmp_path):
    args = ["--trainer.max_epochs=6", "--trainer.limit_train_batches=null", "--trainer.limit_val_batches=null",
            "--trainer.limit_test_batches=null", "--model.net=project.models.ConvNet",
            "--data.source.channels=1"]  # fmt: skip
    result = invoke(folder_fit(tmp_path, image_folder, *args))
    assert result.returncode == 0, result.stderr
    acc = float(next(line for line in result.stdout.splitlines() if "test/acc" in line).split()[-2])
    assert acc >= 0.8  # 3 classes: chance is 0.33


@pytest.mark.slow
def test_predict_on_files_folders_and_globs(fashion_dir, tmp_path):
    root = write_image_folder(tmp_path / "images", fashion_dir, 20, ("train", "train", "val", "test"))
    assert invoke(folder_fit(tmp_path, root, "--data.batch_size=16")).returncode == 0
    run = tmp_path / "logs" / "folder" / "version_0"
    predict = ["predict", *folder_fit(tmp_path, root, "--data.batch_size=16")[1:], "--ckpt_path=best"]
    assert invoke(predict).returncode == 0
    test_rows = read_csv(run / "predict_0" / "predictions.csv")
    assert len(test_rows) == 60 and set(test_rows[0]) >= {"index", "target", "class_3", "probability_3"}
    # the test folder's files, named as a folder: the same images, the same probabilities (resized, normalised
    # as in training)
    result = invoke([*predict, f"--data.predict_files={root / 'test'}"])
    assert result.returncode == 0, result.stderr
    rows = read_csv(run / "predict_1" / "predictions.csv")
    assert [Path(r["file"]).parent.name for r in rows] == [CLASSES[int(r["target"])] for r in test_rows]
    assert [r["probability"] for r in rows] == [r["probability"] for r in test_rows]
    for row in rows:
        probabilities = [float(row[k]) for k in ("probability", "probability_2", "probability_3")]
        assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 1e-4
        assert {row["class_name"], row["class_2"], row["class_3"]} == set(CLASSES)
    # a glob (quoted: the template expands it), a file of another size, and a file that is no image
    big = tmp_path / "big.png"
    from torchvision.io import write_png

    write_png(torch.randint(0, 255, (3, 300, 200), dtype=torch.uint8), str(big))
    (tmp_path / "notes.png").write_text("not an image")
    pattern = str(root / "val" / "*" / "*.png")
    result = invoke([*predict, f"--data.predict_files=[{pattern}, {big}, {tmp_path / 'notes.png'}]",
                     "--predictions.top_k=1"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipped 1 of" in result.stderr and "notes.png" in result.stderr
    rows = read_csv(run / "predict_2" / "predictions.csv")
    pngs = sorted(str(p) for p in (root / "val").glob("*/*.png"))
    assert [r["file"] for r in rows] == [*pngs, str(big)] and "class_2" not in rows[0]
    result = invoke([*predict, f"--data.predict_files={tmp_path / 'nothing' / '*.jpg'}"])
    assert result.returncode == 1 and "matches no files" in result.stderr


def test_checkpoint_keeps_the_normalisation_and_classes(image_folder, tmp_path):
    assert invoke(folder_fit(tmp_path, image_folder)).returncode == 0
    last = tmp_path / "logs" / "folder" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    dm = folder_data(image_folder, tmp_path / "data")  # the train split's statistics, measured again
    assert torch.allclose(ckpt["state_dict"]["normalize.mean"], torch.tensor(dm.mean))
    assert torch.allclose(ckpt["state_dict"]["normalize.std"], torch.tensor(dm.std))
    assert ckpt["hyper_parameters"]["classes"] == list(CLASSES) and tuple(ckpt["hyper_parameters"]["in_shape"]) == (
        3,
        28,
        28,
    )
    # the module alone, as a user's script loads it, predicts as the run does: uint8 images or floats in [0, 1]
    model = ImageClassifier.load_from_checkpoint(last).eval()
    x = dm.test_set.x[:16]
    with torch.no_grad():
        assert torch.equal(model(x), model(x.float() / 255).to(model(x).dtype)) or torch.allclose(
            model(x), model(x.float() / 255), atol=1e-5
        )


@pytest.mark.parametrize(
    "make, error, expected",
    [
        (lambda r: shutil.rmtree(r), DataError, "does not exist"),
        (lambda r: [shutil.rmtree(r / c) for c in ("bag", "sneaker")], DataError, r"one class folder \(trouser\)"),
        (lambda r: [shutil.rmtree(r / c) for c in CLASSES], DataError, "no class folders"),
        (lambda r: [p.unlink() for p in (r / "bag").iterdir()], DataError, "class folder .*bag holds no images"),
        (lambda r: [p.write_bytes(b"\x89PNG broken") for p in (r / "bag").iterdir()], DataError,
         "bag of .* hold no image that torchvision can decode"),
        (lambda r: (r / "val" / "cat").mkdir(parents=True), DataError, "cat is not a class of the train split"),
    ],
    ids=["missing", "one-class", "no-classes", "empty-class", "all-corrupt", "unknown-class"],
)  # fmt: skip
def test_folders_that_cannot_train_say_why(fashion_dir, tmp_path, make, error, expected):
    root = write_image_folder(tmp_path / "images", fashion_dir, 10, ("train",) if "cat" in expected else ())
    make(root)
    with pytest.raises(error, match=expected):
        folder_data(root, tmp_path, batch_size=4)


def test_bad_folders_and_settings_through_the_cli(image_folder, fashion_dir, tmp_path):
    # corrupt files are skipped, counted and named; the run goes on
    root = write_image_folder(tmp_path / "images", fashion_dir, 30)
    (root / "bag" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "bag" / "readme.txt").write_text("not an image, and not named like one: ignored")
    result = invoke(folder_fit(tmp_path, root))
    assert result.returncode == 0, result.stderr
    assert "skipped 1 of 90 files" in result.stderr and "0001.png" in result.stderr
    for args, code, expected in (
        ([f"--data.source.root={root / 'bag' / '0002.png'}"], 1, "is a file, not a directory"),
        (["--data.source.image_size=0"], 2, "image_size=0"),
        (
            ["--data.source.image_size=4", "--model.net=project.models.ConvNet"],
            2,
            "fails on a batch of images of shape (3, 4, 4)",
        ),
        (["--data.test_size=0.0"], 2, "data.test_size=0.0 cannot split"),
        (["--data.val_size=0.6", "--data.test_size=0.5"], 2, "leave no training images"),
    ):
        result = invoke(folder_fit(tmp_path, root, *args))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code and expected in lines[-1] and "Traceback" not in result.stderr, result.stderr


def test_decoding_what_users_have(tmp_path):
    from PIL import Image

    gray = (torch.arange(20 * 24).reshape(20, 24) % 251).to(torch.uint8)
    # 16-bit PNG: scaled to 8 bits, not cut to its low byte
    Image.fromarray(gray.numpy().astype("uint16") * 257).save(tmp_path / "deep.png")
    assert torch.equal(decode(tmp_path / "deep.png", (20, 24), 1)[0], gray)
    # WebP and GIF decode to RGB whatever is asked: converted to the channels configured
    rgb = Image.fromarray(gray.numpy()).convert("RGB")
    rgb.save(tmp_path / "x.webp", lossless=True)
    rgb.save(tmp_path / "x.gif")
    for name in ("x.webp", "x.gif"):
        assert decode(tmp_path / name, (20, 24), 1).shape == (1, 20, 24)
        assert decode(tmp_path / name, (20, 24), 3).shape == (3, 20, 24)
    # a phone photo: EXIF orientation 6 (rotate 90 degrees clockwise to view) is applied, as a viewer would
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(gray.numpy()).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    assert decode(tmp_path / "phone.jpg", (24, 20), 1).shape == (1, 24, 20)
    upright = decode(tmp_path / "phone.jpg", (24, 20), 1)[0].float()
    assert (upright - gray.T.flip(1).float()).abs().mean() < 3  # JPEG is lossy


def test_split_folder_names_hidden_folders_and_other_files(fashion_dir, tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", fashion_dir, 10, ("train", "valid", "testing"))
    layout = folders.scan(root)
    assert {k: len(v[0]) for k, v in layout.splits.items()} == {"train": 30, "val": 30, "test": 30}  # 3 classes
    (root / "train" / "bag" / ".thumbs").mkdir()
    shutil.copy(root / "train" / "bag" / "0000.jpg", root / "train" / "bag" / ".thumbs" / "t.jpg")
    (root / "train" / "bag" / "notes.txt").write_text("x")
    (root / "train" / "bag" / "scan.bmp").write_bytes(b"BM")
    assert len(folders.scan(root).splits["train"][0]) == 30  # the hidden folder's image is not a training image
    folder_data(root, tmp_path, batch_size=4)
    assert "ignored 2 files" in capsys.readouterr().err
    (root / "extra").mkdir()
    with pytest.raises(DataError, match="has train/ and also extra/"):
        folders.scan(root)


def test_ctrl_c_while_decoding_stops_and_caches_nothing(image_folder, tmp_path, monkeypatch):
    from project.signals import Interrupted, StopSignals

    calls = []

    def decode_then_signal(*args):
        calls.append(1)
        if len(calls) == 70:
            StopSignals.signum = 2  # what the SIGINT handler records
        return decode(*args)

    def getitem(self, i):
        return decode_then_signal(self.files[i], self.size, self.channels), -1

    monkeypatch.setattr(folders.Decoded, "__getitem__", getitem)
    with StopSignals(), pytest.raises(Interrupted) as stopped:
        folders.cache(folders.scan(image_folder), (28, 28), 3, tmp_path, 2048, 0)
    assert stopped.value.exit_code == 130 and len(calls) < 300 and not (tmp_path / "folders").exists()


@pytest.mark.slow
def test_a_changed_folder_after_training(fashion_dir, tmp_path):
    root = write_image_folder(tmp_path / "images", fashion_dir, 20)
    assert invoke(folder_fit(tmp_path, root)).returncode == 0
    run = tmp_path / "logs" / "folder" / "version_0"
    # the folder moved: export and predict are told where it is now
    moved = root.rename(tmp_path / "moved")
    result = invoke(["export", str(run)])
    assert result.returncode == 1 and f"data.source.root {root} does not exist" in result.stderr
    assert invoke(["export", str(run), f"--data.source.root={moved}"]).returncode == 0
    out = run / "export_0"
    result = invoke(["export", str(run), f"--data.source.root={moved}", f"--out={out}"])
    assert result.returncode == 2 and "exist there already" in result.stderr
    # a class added since: one message naming both lists of classes
    shutil.copytree(moved / "bag", moved / "coat")
    last = run / "checkpoints" / "last.ckpt"
    for command in (["export", str(run), f"--data.source.root={moved}"],
                    ["test", *folder_fit(tmp_path, moved)[1:], f"--ckpt_path={last}"]):  # fmt: skip
        result = invoke(command)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "trained on the 3 classes bag, sneaker, trouser" in result.stderr
        assert "now has 4: bag, coat, sneaker, trouser" in result.stderr
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoints", "export_0"]  # no test_<k> left


def test_a_failed_fit_leaves_no_run_directory(image_folder, tmp_path):
    result = invoke(folder_fit(tmp_path, image_folder, "--data.batch_size=1000"))
    assert result.returncode == 2 and "data.batch_size=1000" in result.stderr
    assert not list((tmp_path / "logs" / "folder").glob("version_*"))


def test_test_split_predictions_name_their_files(image_folder, tmp_path):
    assert invoke(folder_fit(tmp_path, image_folder)).returncode == 0
    predict = ["predict", *folder_fit(tmp_path, image_folder)[1:], "--ckpt_path=best"]
    assert invoke(predict).returncode == 0
    rows = read_csv(tmp_path / "logs" / "folder" / "version_0" / "predict_0" / "predictions.csv")
    assert all(Path(r["file"]).parent.name == CLASSES[int(r["target"])] for r in rows) and len(rows) > 10
    result = invoke([*predict, f"--data.predict_files=[{image_folder / 'bag' / '0001.png'}, {tmp_path / 'nope.png'}]"])
    assert result.returncode == 1 and "nope.png does not exist" in result.stderr


def test_links_unreadable_files_and_names_with_glob_characters(fashion_dir, tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", fashion_dir, 10)
    extra = write_image_folder(tmp_path / "more", fashion_dir, 12)
    # a linked folder inside a class folder is followed (once, and a link back up is no loop); a dangling link is
    # skipped and named like an undecodable file
    (root / "bag" / "more").symlink_to(extra / "bag")
    (root / "bag" / "loop").symlink_to(root / "bag")
    (root / "sneaker" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    layout = folders.scan(root)
    bags = [f for f, label in zip(*layout.splits["train"], strict=True) if CLASSES[label] == "bag"]
    assert len(bags) == 10 + 12
    data = folder_data(root, tmp_path / "cache", batch_size=4)
    assert sum(len(s) for s in (data.train_set, data.val_set, data.test_set)) == 10 * 3 + 12
    err = capsys.readouterr().err
    assert "skipped 1 of 43 files" in err and "gone.png" in err and "cannot be read or decoded" in err
    # a file whose name has glob characters is that file; a pattern that matches nothing is an error, not dropped
    shutil.copy(root / "bag" / "0001.png", tmp_path / "photo [1].png")
    assert folders.expand([str(tmp_path / "photo [1].png")]) == [tmp_path / "photo [1].png"]
    with pytest.raises(DataError, match=r"nope/\*.png matches no files"):
        folders.expand([str(root / "bag" / "0001.png"), str(tmp_path / "nope" / "*.png")])


def test_a_class_named_like_a_split_and_an_empty_folder_name_say_so(fashion_dir, tmp_path):
    root = write_image_folder(tmp_path / "images", fashion_dir, 2)
    (root / "sneaker").rename(root / "train")
    with pytest.raises(DataError, match="train/ is the train split: no class can be named train"):
        folders.classes_of(root)
    result = invoke(folder_fit(tmp_path, root, "--data.source.root="))
    assert (
        result.returncode == 2
        and "data.source.root: Not of type AbsolutePath: an empty path" in result.stderr.splitlines()[-1]
    )
    result = invoke(folder_fit(tmp_path, root, "--data.source.in_memory_max_mb=-1"))
    assert result.returncode == 2 and "in_memory_max_mb=-1 cannot be negative" in result.stderr.splitlines()[-1]


def test_a_damaged_cache_is_rebuilt_not_trained_on(image_folder, tmp_path, capsys):
    first = folder_data(image_folder, tmp_path)
    (cache,) = (tmp_path / "folders").glob("*.pt")
    with open(cache, "r+b") as f:  # bytes in the middle of the images, the file's length and structure intact
        f.seek(cache.stat().st_size // 2)
        f.write(b"\xff" * 20_000)
    again = folder_data(image_folder, tmp_path)
    assert "are damaged; decoding them again" in capsys.readouterr().err
    assert torch.equal(again.train_set.x, first.train_set.x)


@pytest.mark.slow
def test_a_run_keeps_its_folder_whatever_the_directory(image_folder, tmp_path):
    # the folder given relative to where fit ran is saved absolute: test, resume and export from elsewhere read it
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "photos").symlink_to(image_folder)
    args = [a for a in folder_fit(tmp_path, image_folder) if not a.startswith("--data.source.root")]
    result = run([*args, "--data.source.root=photos"], cwd=tmp_path / "here")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "logs" / "folder" / "version_0" / "config.yaml").read_text())
    assert saved["data"]["init_args"]["source"]["init_args"]["root"] == str(tmp_path / "here" / "photos")


def test_an_unquoted_pattern_is_named(image_folder, tmp_path):
    # the shell expands photos/bag/*.png before the template sees it: many values for one option
    bags = sorted(str(p) for p in (image_folder / "bag").glob("*.png"))[:4]
    predict = ["predict", *folder_fit(tmp_path, image_folder)[1:], "--ckpt_path=best", "--data.predict_files", *bags]
    result = invoke(predict)
    message = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "data.predict_files takes one value, and 4 came" in message
    assert "Quote the pattern" in message and not (tmp_path / "logs").exists()
