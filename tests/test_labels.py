"""Real-world labels: imbalanced classes (a balanced sampler, class-weighted loss, per-class test report)."""

import csv
from pathlib import Path

import pytest
import torch
from conftest import FOLDER_CLASSES, folder_fit, invoke
from torchvision.io import write_png

from project.data import registry
from project.data.datamodule import _BalancedEpochSample


def imbalanced_folder(root: Path, fashion_dir: Path, train: dict[str, int], test: int) -> Path:
    """Real Fashion-MNIST images as a folder with train/ of the given size per class and a balanced test/."""
    x, y = registry.load("fashion_mnist", fashion_dir, train=False)
    for name, label in FOLDER_CLASSES.items():
        images = x[y == label]
        for split, part in (("train", images[: train[name]]), ("test", images[-test:])):
            for i, image in enumerate(part):
                path = root / split / name / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_png(image, str(path))
    return root


def report(run: Path) -> dict[str, dict[str, str]]:
    with open(run / "test_report.csv") as f:
        return {row["class"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_a_small_class_is_found_more_often_with_the_balanced_options(tmp_path, fashion_dir):
    root = imbalanced_folder(tmp_path / "photos", fashion_dir, {"trouser": 200, "sneaker": 200, "bag": 10}, 50)
    recalls = {}
    for name, extra in (("plain", []), ("balanced", ["--data.balanced=true", "--model.class_weights=balanced"])):
        result = invoke(folder_fit(tmp_path / name, root, "--trainer.max_epochs=3", "--trainer.limit_train_batches=1.0",
                                   "--trainer.limit_test_batches=1.0", *extra))  # fmt: skip
        assert result.returncode == 0, result.stderr
        noted = "the training classes differ in size by more than 10x (bag 9, " in result.stderr
        assert noted == (name == "plain"), result.stderr  # said where nothing is done about it
        run = tmp_path / name / "logs" / "folder" / "version_0"
        rows = report(run)
        assert [int(rows[c]["support"]) for c in sorted(FOLDER_CLASSES)] == [50, 50, 50]
        recalls[name] = float(rows["bag"]["recall"])
        macro = sum(float(rows[c]["recall"]) for c in FOLDER_CLASSES) / 3
        assert float(rows["macro mean"]["recall"]) == pytest.approx(macro, abs=1e-4)
        checkpoint = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), weights_only=True)
        weights = checkpoint["state_dict"]["class_weight"]
        counts = torch.tensor([9.0, 180, 180])  # bag, sneaker, trouser less the validation images carved from train/
        expected = counts.sum() / (3 * counts) if name == "balanced" else torch.ones(3)
        assert torch.allclose(weights, expected, rtol=0.05), weights
    assert recalls["balanced"] > recalls["plain"] + 0.2, recalls


def test_the_balanced_sample_draws_every_class_as_often_from_seed_and_epoch():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    sample = _BalancedEpochSample(labels, seed=7)
    first = list(sample)
    assert len(first) == 1000 and first == list(sample)  # the same epoch: the same draw
    sample.set_epoch(1)
    second = list(sample)
    fresh = _BalancedEpochSample(labels, seed=7)  # a resumed run's: epoch 1 drawn from the seed and the epoch alone
    fresh.set_epoch(1)
    assert second != first and second == list(fresh)
    shares = torch.bincount(labels[torch.tensor(first + second)], minlength=3) / 2000
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.04), shares
