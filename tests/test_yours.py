"""Make it yours: the README's own files (a net, a LightningModule subclass, a data module, a torchvision dataset by
config), written into a directory outside the repository, and the README's commands run from there; what a user's
class that lacks a part of the contract is told."""

import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from conftest import ROOT, forked, invoke, md5, write_idx
from PIL import Image

from project.data import ImageDataModule, MapDataset

README = (ROOT / "README.md").read_text()
# a short run: what the tests add to the README's commands
QUICK = ["--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
         "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--data.batch_size=32"]  # fmt: skip


def readme_file(name: str) -> str:
    """The README's code block that starts with ``# NAME``."""
    match = re.search(rf"```(?:python|yaml)\n(# {re.escape(name)}\n.*?)```", README, re.DOTALL)
    assert match, f"README has no code block for {name}"
    return match.group(1)


def readme_command(start: str) -> list[str]:
    """The arguments of the README's ``python -m project ...`` line that starts with ``start``."""
    for line in re.findall(r"^python -m project (.+?)(?:\s+#.*)?$", README, re.MULTILINE):
        if line.startswith(start):
            return line.split()
    raise AssertionError(f"README has no command python -m project {start}...")


@pytest.fixture
def yours(tmp_path) -> Path:
    """A directory outside the repository holding the README's files."""
    here = tmp_path / "yours"
    here.mkdir()
    for name in ("mynet.py", "focal.py", "shoes.py", "tvdata.yaml"):
        (here / name).write_text(readme_file(name))
    return here


def project(args: list[str], here: Path, log: str):
    """``python -m project ARGS`` run from ``here``, as a user's shell there would (in a forked process)."""
    result = forked(args, here / f"{log}.log", cwd=here)
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    return result


@pytest.mark.slow
def test_your_net_and_lightning_module_through_fit_test_resume_export(yours, fashion_dir):
    data = [f"--data.data_dir={fashion_dir}"]
    result = project([*readme_command("fit --model.net mynet.TinyCNN"), *data, *QUICK, "--data.eval_batch_size=100",
                      "--trainer.logger.init_args.name=tiny"], yours, "net")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    fit = readme_command("fit --model focal.FocalClassifier")
    result = project([*fit, *data, *QUICK, "--data.eval_batch_size=100"], yours, "focal")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "test/recall" in result.stdout  # the subclass's extra metric, in the test of its best checkpoint
    run = yours / "logs" / "fashion_mnist_cnn" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "focal.FocalClassifier" and config["model"]["init_args"]["gamma"] == 1.5
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    outputs = {}
    for command in ("test --ckpt_path best", "resume", "export"):
        args = [*readme_command(command), *([] if command == "export" else [*data, *QUICK[5:7]])]
        result = project(args, yours, command.split()[0])
        assert result.returncode == 0, (command, result.stdout[-3000:])
        outputs[command.split()[0]] = result.stdout
    assert "test/recall" in outputs["test"]  # the checkpoint's class, from its hyperparameters
    assert re.search(r"model.onnx .* top-1 agreement (\d+)/\1", outputs["export"])
    # a plain script with the checkpoint alone predicts what predict does: the model holds its classes and statistics
    predict = [
        "predict",
        *data,
        f"--ckpt_path={best}",
        "--trainer.limit_predict_batches=5",
        "--data.eval_batch_size=100",
    ]
    assert project(predict, yours, "predict").returncode == 0
    sys.path.insert(0, str(yours))  # a script of the user's, in their directory
    try:
        from focal import FocalClassifier
    finally:
        sys.path.remove(str(yours))
    model = FocalClassifier.load_from_checkpoint(best).eval()
    images = torchvision.datasets.FashionMNIST(str(fashion_dir), train=False).data[:500, None]
    with open(run / "predict_0" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 500
    with torch.no_grad():
        for x in (images, images.float() / 255):  # uint8, or floats in [0, 1]
            assert [int(r["prediction"]) for r in rows] == model(x).argmax(1).tolist()


@pytest.mark.slow
def test_your_data_module_through_every_command(yours, fashion_dir):
    data = [f"--data.root={fashion_dir}"]
    result = project([*readme_command("fit --data shoes.ShoesData"), *data, *QUICK], yours, "fit")
    assert result.returncode == 0, result.stdout[-3000:]
    run = yours / "logs" / "shoes" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["class_path"] == "shoes.ShoesData" and config["data"]["init_args"]["root"] == str(fashion_dir)
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["hyper_parameters"]["classes"] == ["Sandal", "Sneaker", "Boot"]
    evaluate = ["--config", str(run / "config.yaml"), f"--ckpt_path={last}", *QUICK[5:7]]
    assert project(["validate", *evaluate], yours, "validate").returncode == 0
    assert project(["predict", *evaluate, "--trainer.limit_predict_batches=1"], yours, "predict").returncode == 0
    with open(run / "predict_0" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1000 and {r["class_name"] for r in rows} <= {"Sandal", "Sneaker", "Boot"}
    assert "file" not in rows[0]  # the data module has no predict_paths
    assert project(["resume", str(run), "--trainer.enable_progress_bar=false"], yours, "resume").returncode == 0
    assert project(["export", str(run), "--images=16"], yours, "export").returncode == 0
    shoes = ["--data=shoes.ShoesData", *data, "--data.batch_size=32", "--trainer.accelerator=cpu"]
    assert project(["lr-plot", *shoes, "--trainer.max_epochs=2", "--out=lr.png"], yours, "lr-plot").returncode == 0
    assert (yours / "lr.png").is_file()  # its training batches counted: the data module has no steps_per_epoch
    result = project(["lr-find", *shoes, "--steps=20", "--min_lr=1e-4", "--out=lr.yaml"], yours, "lr-find")
    assert result.returncode in (0, 2) and "lr-find" in result.stdout + (yours / "lr-find.log").read_text()
    result = project(["batch-size-find", *shoes, "--max_trials=2", "--out=bs.yaml"], yours, "bs")
    assert result.returncode == 0 and yaml.safe_load((yours / "bs.yaml").read_text())["data"]["batch_size"] == 64
    (yours / "shoes.yaml").write_text(yaml.safe_dump({"data": {"class_path": "shoes.ShoesData",
                                                               "init_args": {"root": str(fashion_dir)}}}))  # fmt: skip
    extra = [*QUICK, "--trainer.limit_test_batches=1"]
    result = project(["compare", "shoes.yaml", "--name=mine", "--", *extra], yours, "compare")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "| shoes | ok |" in (yours / "logs" / "experiments" / "mine" / "comparison.md").read_text()
    (yours / "space.yaml").write_text("model.optimizer.init_args.lr: {choices: [0.003]}\n")
    result = project(["search", "--config=shoes.yaml", "--space=space.yaml", "--trials=1", "--", *extra], yours,
                     "search")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert (yours / "logs" / "search" / "space" / "best.yaml").is_file()


def _fashion_idx(root: Path, n_train: int, n_test: int) -> None:
    """A small Fashion-MNIST in the IDX files torchvision's FashionMNIST reads."""
    rng = np.random.default_rng(0)
    raw = root / "FashionMNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)).astype(np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.fixture
def fake_stl10(tmp_path, monkeypatch) -> Path:
    """A small STL-10 in its own binary format (column-major 96x96 RGB planes, labels 1..10, class_names.txt), with
    torchvision's checksums set to these files'."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "yours" / "data" / "stl10_binary"
    folder.mkdir(parents=True)
    for split, n in (("train", 60), ("test", 30), ("unlabeled", 2)):
        rng.integers(0, 255, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            rng.integers(1, 11, n, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    cls = torchvision.datasets.STL10
    monkeypatch.setattr(cls, "train_list", [[f, md5(folder / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(folder / f)] for f, _ in cls.test_list])
    return folder


@pytest.mark.slow
def test_a_torchvision_dataset_by_config_alone(yours, fake_stl10):
    _fashion_idx(yours / "data", 300, 100)
    fit = [*readme_command("fit --config tvdata.yaml"), *QUICK, "--data.eval_batch_size=50", "--data.val_size=50"]
    result = project(fit, yours, "tvdata")
    assert result.returncode == 0, result.stdout[-3000:]
    (cache,) = (yours / "data" / "datasets").glob("FashionMNIST-train-*.pt")
    cached = torch.load(cache, weights_only=True)
    assert cached["images"].shape == (300, 3, 32, 32) and cached["images"].dtype == torch.uint8
    before = cache.stat().st_mtime_ns
    assert project(fit, yours, "tvdata-again").returncode == 0 and cache.stat().st_mtime_ns == before  # decoded once
    stl10 = [
        "fit",
        f"--config={ROOT / 'configs/datasets/stl10.yaml'}",
        *QUICK,
        "--data.val_size=10",
        "--data.eval_batch_size=10",
        "--model.net.init_args.widths=[16,32]",
        "--model.net.init_args.blocks=[1,1]",
    ]
    result = project(stl10, yours, "stl10")
    assert result.returncode == 0, result.stdout[-3000:]
    last = yours / "logs" / "stl10" / "version_0" / "checkpoints" / "last.ckpt"
    hparams = torch.load(last, weights_only=True)["hyper_parameters"]
    assert hparams["classes"][:3] == ["airplane", "bird", "car"] and tuple(hparams["in_shape"]) == (3, 96, 96)


class Squares:
    """A user's own map-style dataset: a bright square top-left (class 0) or bottom-right (class 1)."""

    def __init__(self, n: int, kind: str):
        self.n, self.kind = n, kind

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image = torch.zeros(1, 20, 20)
        label = i % 2
        image[:, label * 10 : label * 10 + 10, label * 10 : label * 10 + 10] = 1.0
        if self.kind == "pil":
            return Image.fromarray((image[0].numpy() * 255).astype(np.uint8)), label
        if self.kind == "numpy":
            return (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8), torch.tensor(label)
        return image, label  # floats in [0, 1]


@pytest.mark.parametrize("kind", ["tensor", "pil", "numpy"])
def test_your_own_dataset_class_is_decoded_once_into_the_cache(tmp_path, kind):
    source = MapDataset(lambda: Squares(40, kind), image_size=16, channels=3, test=lambda: Squares(10, kind), classes=2)
    dm = ImageDataModule(source, 8, str(tmp_path), val_size=8)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.classes == ("0", "1") and dm.shape == (3, 16, 16)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (32, 8, 10)
    x = dm.test_set.x
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 16, 16)
    assert (x[0, :, :4, :4] == 255).all() and (x[0, :, -4:, -4:] == 0).all()  # class 0: the square top-left
    assert (x[1, :, -4:, -4:] == 255).all() and dm.test_set.y.tolist() == [0, 1] * 5
    assert len(dm.mean) == 3 and 0 < dm.mean[0] < 1  # measured on the train split


NO_CLASSES = """
from lightning.pytorch import LightningDataModule


class NoClasses(LightningDataModule):
    shape = (1, 28, 28)
"""


def test_a_data_module_that_lacks_a_part_says_which_and_what_for(tmp_path, monkeypatch):
    (tmp_path / "nodata.py").write_text(NO_CLASSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke(["fit", "--data=nodata.NoClasses", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the data module nodata.NoClasses has no 'classes': its class names in label order")
