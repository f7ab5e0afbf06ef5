"""Real-world labels: imbalanced classes (a balanced sampler, class-weighted loss, per-class test report), labels
from a CSV, calibrated probabilities (temperature scaling, ECE, reliability diagram)."""

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import onnxruntime
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import FOLDER_CLASSES, TINY, fit_args, folder_fit, forked, invoke, tiny_experiment
from torchvision.io import write_png

from project.commands.compare import paired_t, table_of_seeds
from project.data import registry
from project.data.datamodule import _BalancedEpochSample
from project.data.folder import scan_csv
from project.errors import ConfigError, DataError
from project.module import ImageClassifier, best_threshold, fit_temperature


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


def write_csv(path: Path, rows: list[tuple[str, ...]], header: str = "path,label,split") -> Path:
    path.write_text(header + "\n" + "".join(",".join(row) + "\n" for row in rows))
    return path


def csv_fit(tmp_path: Path, table: Path, *extra: str) -> list[str]:
    return [*folder_fit(tmp_path, table.parent, *extra), "--data.source=project.data.CSVLabels",
            f"--data.source.csv={table}", "--data.source.image_size=28"]  # fmt: skip


@pytest.mark.slow
def test_a_csv_of_labels_trains_predicts_and_exports(tmp_path, image_folder):
    # the folder's images listed from a CSV beside them: relative paths, splits by column (one by another spelling)
    image_folder = Path(shutil.copytree(image_folder, tmp_path / "images"))
    files = sorted(p.relative_to(image_folder) for p in image_folder.rglob("*") if p.is_file())
    splits = ["train"] * 7 + ["valid", "test", "test"]
    rows = [(str(f), f.parent.name.upper(), splits[i % 10]) for i, f in enumerate(files)]
    table = write_csv(image_folder / "labels.csv", rows)
    result = invoke(csv_fit(tmp_path, table, "--trainer.max_epochs=2"))
    assert result.returncode == 0, result.stderr
    assert "3 classes; train 210, validation 30 images, test: the source's own" in result.stdout
    run = tmp_path / "logs" / "folder" / "version_0"
    assert [int(report(run)[c]["support"]) for c in ("BAG", "SNEAKER", "TROUSER")] == [20, 20, 20]
    assert invoke(["predict", f"--config={run / 'config.yaml'}", "--ckpt_path=best"]).returncode == 0
    with open(run / "predict_0" / "predictions.csv") as f:
        predicted = list(csv.DictReader(f))
    tested = {str(image_folder / f) for f, _, split in rows if split == "test"}
    assert len(predicted) == 60 and {row["file"] for row in predicted} == tested
    result = invoke(["export", str(run)])
    assert result.returncode == 0 and "top-1 agreement 60/60\n  model.pt2" in result.stdout, result.stderr


def test_a_csv_s_bad_rows_are_named_by_line(tmp_path, image_folder):
    image_folder = Path(shutil.copytree(image_folder, tmp_path / "images"))
    good = sorted(str(p.relative_to(image_folder)) for p in image_folder.rglob("*.png"))
    rows = [(good[0], "bag", "train"), (good[150], "trouser", ""), ("bag/nowhere.png", "bag", "train"),
            (good[0], "bag", "test"), (good[1], "cat", "train"), (good[2], "bag", "holdout"),
            (good[3], "", "train")]  # fmt: skip
    table = write_csv(image_folder / "bad.csv", rows)
    result = invoke([*csv_fit(tmp_path, table), "--data.source.classes=[bag,trouser]"])
    message = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(message) == 1, result.stderr  # a DataError: the files, not the settings
    for said in ("1 row has a file that does not exist: line 4 (bag/nowhere.png)",
                 "1 row has a split that is not train, val or test: line 7 ('holdout')",
                 "1 row has a label that is none of the classes (bag, trouser): line 6 ('cat')",
                 "1 row has no label: line 8",
                 f"1 row has a file that an earlier line names: line 5 ({good[0]}, as line 2)"):  # fmt: skip
        assert said in message[0], message
    result = invoke([*csv_fit(tmp_path, table), "--data.source.classes=[bag,trouser,bag]"])
    assert result.returncode == 2 and "data.source.classes names bag more than once" in result.stderr
    for text, expected in (("name,label\na.png,b\n", "has the columns name, label; it needs a header with path and"),
                           ("path,label\n", "lists no images")):  # fmt: skip
        (image_folder / "bad.csv").write_text(text)
        result = invoke(csv_fit(tmp_path, table))
        assert result.returncode == 1 and expected in result.stderr, result.stderr


def test_temperature_scaling_finds_the_temperature_that_made_logits_overconfident():
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (4000,), generator=generator)
    calibrated = torch.randn(4000, 5, generator=generator) + 2 * F.one_hot(y, 5)  # logits whose softmax is honest
    labels = torch.distributions.Categorical(logits=calibrated).sample()  # labels drawn from those probabilities
    assert fit_temperature(calibrated * 3, labels) == pytest.approx(3, rel=0.1)  # three times too sharp


@pytest.mark.slow
def test_calibrate_saves_the_temperature_and_predict_and_export_divide_by_it(tmp_path, fashion_dir):
    result = invoke(fit_args(tmp_path, fashion_dir, "--model.calibrate=true", "--trainer.max_epochs=2"))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "logs" / "fashion_mnist_cnn" / "version_0"
    with open(run / "record.csv") as f:
        rows = list(csv.DictReader(f))
    fitted = [float(r["val/temperature"]) for r in rows if r["stage"] == "fit"]
    assert len(fitted) == 2 and all(t > 0 and t != 1 for t in fitted) and rows[-1]["test/ece"]
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    model = ImageClassifier.load_from_checkpoint(best, weights_only=True).eval()
    temperature = model.temperature.item()
    assert min(abs(temperature - t) for t in fitted) < 1e-5
    assert (run / "reliability.png").read_bytes().startswith(b"\x89PNG")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        raw = model._logits(model.normalize(images))
        assert torch.allclose(model(images), raw / temperature)
    result = invoke(["export", str(run), "--ckpt_path=best"])
    assert result.returncode == 0, result.stderr
    session = onnxruntime.InferenceSession(str(run / "export_0" / "model.onnx"))
    exported = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    assert torch.allclose(torch.from_numpy(exported), raw / temperature, atol=1e-4)  # the temperature exported
    info = json.loads((run / "export_0" / "model.json").read_text())
    assert info["output"]["temperature"] == pytest.approx(temperature) and "temperature" in info["output"]["meaning"]


def test_folds_partition_the_pool_and_leave_the_test_images_alone(image_folder, tmp_path):
    from project.data import ImageDataModule, ImageFolder

    trains, vals, tests = [], [], []
    for fold in range(3):
        dm = ImageDataModule(ImageFolder(str(image_folder), image_size=28), 16, str(tmp_path), folds=3, fold=fold)
        dm.setup("fit")
        trains.append(set(dm._train_index.tolist()))
        vals.append(len(dm.val_set))
        tests.append(dm.test_paths)
    assert tests[0] == tests[1] == tests[2] and 20 < len(tests[0]) < 40  # the same test images for every fold
    pool = set.union(*trains)
    held_out = [pool - train for train in trains]  # what each fold validates on
    assert len(pool) == 300 - len(tests[0]) and [len(h) for h in held_out] == vals
    assert set.union(*held_out) == pool and sum(map(len, held_out)) == len(pool)  # each pool image validates once
    with pytest.raises(ConfigError, match="give 2 folds or more"):
        ImageDataModule(ImageFolder(str(image_folder), image_size=28), 16, str(tmp_path), fold=1)  # no folds
    # under DDP, each process's share of the training images must hold a batch
    dm = ImageDataModule(ImageFolder(str(image_folder), image_size=28), 150, str(tmp_path), val_size=0.1)
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match=r"data.batch_size=150 is more than the 1\d\d training images each of the 2"):
        dm.setup("fit")


def test_compare_folds_says_at_once_that_a_data_module_takes_no_folds(tmp_path, monkeypatch):
    (tmp_path / "few.py").write_text(
        "import lightning\n\n\nclass Few(lightning.LightningDataModule):\n"
        "    def __init__(self, batch_size: int = 8):\n        super().__init__()\n"
        "        self.shape, self.classes = (1, 28, 28), ['a', 'b']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "base.yaml").write_text("data:\n  class_path: few.Few\n")
    (experiment / "one.yaml").write_text("trainer:\n  max_epochs: 1\n")
    result = invoke(["compare", str(experiment), "--folds=2", f"--logs={tmp_path / 'logs'}"])
    assert result.returncode == 2 and "the data module needs both arguments" in result.stderr, result.stderr
    assert "Option 'folds' is not accepted" in result.stderr and "training" not in result.stdout


@pytest.mark.slow
def test_compare_folds_trains_a_variant_on_every_fold(tmp_path, fashion_dir):
    experiment = tiny_experiment(tmp_path, fashion_dir)
    (experiment / "linear.yaml").unlink()  # one variant: the table's paired test is the next test's
    logs = tmp_path / "logs"
    result = forked(["compare", str(experiment), f"--logs={logs}", "--folds=2", "--", *TINY], tmp_path / "log")
    assert result.returncode == 0, result.stdout[-3000:]
    runs = sorted(p.name for p in (logs / "tiny" / "mlp").iterdir() if p.is_dir())
    assert runs == ["fold_0", "fold_1"]
    data = [yaml.safe_load((logs / "tiny" / "mlp" / r / "version_0" / "config.yaml").read_text())["data"]
            for r in runs]  # fmt: skip
    assert [(d["init_args"]["folds"], d["init_args"]["fold"]) for d in data] == [(2, 0), (2, 1)]
    with open(logs / "tiny" / "comparison.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["runs ok"] == "2" and row["p vs best (paired)"] == "best" and " +- " in row["test acc"]
    assert "2 folds per variant" in (logs / "tiny" / "comparison.md").read_text()


def test_the_paired_test_pairs_runs_by_fold_and_matches_a_table():
    # differences 0.01, 0.02, 0.03: t = 0.02 / (0.01 / sqrt 3) = 3.464, 2 degrees of freedom: p = 0.0742
    a = {(None, k): 0.5 + d for k, d in enumerate((0.01, 0.02, 0.03))}
    b = {(None, k): 0.5 for k in range(3)}
    assert paired_t(a, b) == pytest.approx(0.0742, abs=1e-4)
    # in the table: runs of a variant paired with the best's of the same fold, whatever order they finished in
    run = {"best val acc": 0.9, "train-val gap": 0.0, "wall s": 1.0, "val acc at": [(1, 0.9)], "curves": {},
           "params": 1}  # fmt: skip
    results = {"good": [{**run, "test acc": 0.6, "pair": (None, k)} for k in range(3)],
               "less": [{**run, "test acc": b[(None, k)] + 0.1 - (0.01, 0.02, 0.03)[k], "pair": (None, k)}
                        for k in (2, 0, 1)]}  # fmt: skip
    rows, _ = table_of_seeds(results, {}, None, paired=True)
    assert [r["p vs best (paired)"] for r in rows] == ["best", "0.074"]


def multilabel_csv(folder: Path) -> Path:
    """The folder's images with several labels each: "striped" for every third one, "dark" for every fourth, and its
    class, given as label a|b|c."""
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.png"))
    rows = []
    for i, f in enumerate(files):
        labels = ["striped"] * (i % 3 == 0) + ["dark"] * (i % 4 == 0) + [f.parent.name]
        rows.append((str(f), "|".join(labels), "train" if i % 10 < 8 else "val" if i % 10 == 8 else "test"))
    return write_csv(folder / "multi.csv", rows)


@pytest.mark.slow
def test_a_multilabel_csv_trains_predicts_with_its_threshold_and_exports(tmp_path, image_folder):
    folder = Path(shutil.copytree(image_folder, tmp_path / "images"))
    table = multilabel_csv(folder)
    fit = [*csv_fit(tmp_path, table, "--trainer.max_epochs=2"), "--data.source.multilabel=true",
           "--model.label_smoothing=0.1"]  # fmt: skip
    result = invoke(fit)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "logs" / "folder" / "version_0"
    rows = report(run)
    assert list(rows) == ["bag", "dark", "sneaker", "striped", "trouser", "macro mean"]
    with open(run / "record.csv") as f:
        record = list(csv.DictReader(f))
    threshold = float(next(r for r in record if r["val/threshold"])["val/threshold"])
    assert 0 < threshold < 1 and all(record[-1][k] for k in ("test/map", "test/exact_match", "test/f1"))
    predict = ["predict", f"--config={run / 'config.yaml'}", "--ckpt_path=last", "--predictions.top_k=5"]
    assert invoke(predict).returncode == 0
    with open(run / "predict_0" / "predictions.csv") as f:
        predicted = list(csv.DictReader(f))
    model = ImageClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    for row in predicted:  # the labels given: every class whose probability reaches the checkpoint's threshold
        probability = {row["class_name"]: float(row["probability"])}
        probability |= {row[f"class_{k}"]: float(row[f"probability_{k}"]) for k in range(2, 6)}
        given = {c for c, p in probability.items() if p >= model.threshold.item()}
        assert set(filter(None, row["labels"].split("|"))) == given
    with open(table) as f:
        tested = [row for row in csv.DictReader(f) if row["split"] == "test"]
    # the true labels in the classes' order (the CSV gave "striped|bag")
    assert len(predicted) == len(tested) and "bag|striped" in {r["target"] for r in predicted}
    result = invoke(["export", str(run), "--ckpt_path=last"])
    n = len(tested)
    assert result.returncode == 0 and f"top-1 agreement {n}/{n}\n  model.pt2" in result.stdout, result.stderr
    info = json.loads((run / "export_0" / "model.json").read_text())
    assert info["output"]["threshold"] == pytest.approx(model.threshold.item())


def test_multilabel_labels_as_columns_and_what_multilabel_refuses(tmp_path, image_folder):
    folder = Path(shutil.copytree(image_folder, tmp_path / "images"))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    table = write_csv(folder / "wide.csv", [(files[0], "1", "0"), (files[1], "1", "1"), (files[2], "0", "0")],
                      header="path,cat,dog")  # fmt: skip
    layout = scan_csv(table, multilabel=True)
    assert layout.classes == ("cat", "dog") and layout.splits["train"][1] == [[1, 0], [1, 1], [0, 0]]
    write_csv(table, [(files[0], "1", "2"), (files[1], "yes", "1")], header="path,cat,dog")
    bad = r"2 rows have a label cell not 0 or 1: line 2 \(dog='2'\), line 3 \(cat='yes'\)"
    with pytest.raises(DataError, match=bad):
        scan_csv(table, multilabel=True)
    multi = multilabel_csv(folder)
    for flag, said in (("--data.mixup_alpha=0.2", "data.mixup_alpha"), ("--data.balanced=true", "data.balanced"),
                       ("--model.calibrate=true", "model.calibrate"), ("--model.class_weights=balanced",
                                                                       "model.class_weights")):  # fmt: skip
        result = invoke([*csv_fit(tmp_path, multi), "--data.source.multilabel=true", flag])
        assert result.returncode == 2 and said in result.stderr and "multi-label" in result.stderr, result.stderr


def test_the_threshold_is_the_one_with_the_best_macro_f1():
    target = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]])
    probabilities = torch.tensor([[0.7, 0.1], [0.62, 0.2], [0.3, 0.65], [0.58, 0.2]])
    # at 0.60 and 0.65 both classes are exactly right; above, class 1 is lost; below, image 3 gets class 0
    assert best_threshold(probabilities, target) == pytest.approx(0.6)


@pytest.mark.slow
def test_a_checkpoint_from_before_the_new_buffers_still_loads(tmp_path, fashion_dir):
    assert invoke(fit_args(tmp_path, fashion_dir)).returncode == 0
    last = tmp_path / "logs" / "fashion_mnist_cnn" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    for name in ("class_weight", "temperature", "threshold"):
        del checkpoint["state_dict"][name]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    model = ImageClassifier.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    assert model.temperature.item() == 1 and model.threshold.item() == 0.5
    assert invoke(["test", f"--ckpt_path={tmp_path / 'old.ckpt'}", f"--data.data_dir={fashion_dir}",
                   "--trainer.limit_test_batches=2"]).returncode == 0  # fmt: skip


def test_label_smoothing_of_multilabel_targets_pulls_each_towards_one_half():
    model = ImageClassifier(net=lambda shape, n: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, n)),
                            optimizer=torch.optim.SGD, scheduler=None, scheduler_interval="step", in_shape=(1, 2, 2),
                            classes=["a", "b", "c"], channels_last=False, multilabel=True)  # fmt: skip
    logits, target = torch.randn(5, 3), torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]])
    expected = F.binary_cross_entropy_with_logits(logits, target.float() * 0.8 + 0.1)
    assert torch.allclose(model.loss(logits, target, label_smoothing=0.2), expected)
    assert model.net[1].out_features == 3  # one output per class, two classes or more
