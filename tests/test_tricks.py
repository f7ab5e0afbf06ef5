"""Training tricks: EMA and SWA weights, label smoothing, mixup and cutmix, random erasing, test-time augmentation,
the learning-rate and batch-size finders, and compare --seeds."""

import copy
import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, TINY, Child, cli, fit_args, forked, invoke, tiny_experiment

from project.data import ImageDataModule
from project.data.augment import random_erasing
from project.errors import ConfigError
from project.models import ConvNet
from project.module import ImageClassifier

PNG = b"\x89PNG"


def run_dir(tmp_path, version: int = 0):
    return tmp_path / "logs" / "fashion_mnist_cnn" / f"version_{version}"


def ema_args(decay: float = 0.9) -> str:
    return "--trainer.callbacks+=" + json.dumps(
        {"class_path": "project.averaging.EMA", "init_args": {"decay": decay, "warmup": False}}
    )


def test_ema_weights_differ_from_the_raw_ones_and_are_the_ones_saved_and_tested(tmp_path, fashion_dir):
    c = cli(fit_args(tmp_path, fashion_dir, ema_args(), "--trainer.max_epochs=2"))
    ckpt = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    average, raw = ckpt["state_dict"], ckpt["current_model_state"]
    weight = "net.head.1.weight"
    assert not torch.equal(average[weight], raw[weight])
    (ema,) = [cb for cb in c.trainer.callbacks if type(cb).__name__ == "EMA"]
    assert torch.equal(ema._average_model.module.state_dict()[weight], average[weight])
    # 8 steps (2 epochs of 4) with decay 0.9: the first copies, each later one moves 10% towards the weights
    assert ckpt["averaging_state"]["n_averaged"].item() == 8
    # fit's test after training evaluated the best checkpoint's average, as a test of that checkpoint does
    best = next((run_dir(tmp_path) / "checkpoints").glob("best-*.ckpt"))
    tested = c.trainer.callback_metrics["test/loss"].item()
    result = invoke(["test", *fit_args(tmp_path, fashion_dir, ema_args())[1:], f"--ckpt_path={best}"])
    assert result.returncode == 0 and "WeightAveraging" not in result.stderr  # no warning about loading outside fit
    assert float(re.search(r"test/loss\s*│\s*([0-9.]+)", result.stdout).group(1)) == pytest.approx(tested, rel=1e-5)
    raw = classifier_like(c.model, ckpt["current_model_state"])
    assert not torch.equal(raw.state_dict()[weight], c.model.state_dict()[weight])


@pytest.mark.slow
def test_ema_resumes_to_the_same_average(tmp_path, fashion_dir):
    straight = tmp_path / "straight"
    # no one-cycle: its length is the first run's, which the resumed run extends
    cli(fit_args(straight, fashion_dir, ema_args(), "--trainer.max_epochs=2", "--model.scheduler=null"))
    first = fit_args(tmp_path, fashion_dir, ema_args(), "--trainer.max_epochs=1", "--model.scheduler=null")
    assert invoke(first).returncode == 0
    result = invoke(["resume", str(run_dir(tmp_path)), "--trainer.max_epochs=2"])
    assert result.returncode == 0, result.stderr
    a = torch.load(run_dir(straight) / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def classifier_like(model: ImageClassifier, state: dict) -> ImageClassifier:
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other


def test_swa_averages_epoch_ends_from_its_start_epoch(tmp_path, fashion_dir):
    swa = json.dumps({"class_path": "project.averaging.SWA", "init_args": {"start_epoch": 1}})
    cli(fit_args(tmp_path, fashion_dir, f"--trainer.callbacks+={swa}", "--trainer.max_epochs=3"))
    ckpt = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["averaging_state"]["n_averaged"].item() == 2  # the ends of epochs 1 and 2, before their validation
    assert not torch.equal(ckpt["state_dict"]["net.head.1.weight"], ckpt["current_model_state"]["net.head.1.weight"])
    # epoch 0 was validated and saved with the weights themselves (no average yet); from epoch 1 on, the average
    best = torch.load(next((run_dir(tmp_path) / "checkpoints").glob("best-*.ckpt")), weights_only=True)
    assert ("current_model_state" in best) == (best["epoch"] >= 1)


def classifier(**kwargs) -> ImageClassifier:
    kwargs = {"scheduler": None, "scheduler_interval": "epoch", "in_shape": (1, 8, 8), "classes": list("0123456789"),
              "channels_last": False, **kwargs}  # fmt: skip
    torch.manual_seed(0)
    return ImageClassifier(lambda s, n: ConvNet(s, n, widths=[4]), lambda p: torch.optim.SGD(p, lr=0.1), **kwargs)


def test_label_smoothing_is_the_training_loss_only():
    model = classifier(label_smoothing=0.1)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    logits = model(x)
    smoothed = model._step((x, y), smoothing=0.1)[0]
    log_p = logits.log_softmax(1)
    expected = (0.9 * -log_p.gather(1, y[:, None]).squeeze(1) - 0.1 * log_p.mean(1)).mean()
    assert torch.allclose(smoothed, expected) and torch.allclose(model._step((x, y))[0], F.cross_entropy(logits, y))
    binary = classifier(classes=["no", "yes"])
    logits = binary(x)
    z = logits[:, 1]
    assert torch.equal(logits[:, 0], torch.zeros(6))  # a binary net's logit z as (0, z)
    target = y.remainder(2).float()
    assert torch.allclose(binary._step((x, y.remainder(2)), smoothing=0.2)[0],
                          F.binary_cross_entropy_with_logits(z, target * 0.8 + 0.1))  # fmt: skip
    with pytest.raises(ConfigError, match="label_smoothing"):
        classifier(label_smoothing=1.0)


def training_batch(dm: ImageDataModule, n: int = 64):
    dm.trainer = SimpleNamespace(training=True)
    x, y = dm.train_set.__getitems__(torch.arange(n))
    return dm.on_after_batch_transfer((x, y), 0)


@pytest.mark.parametrize("mix", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}], ids=["mixup", "cutmix"])
def test_mixed_targets_sum_to_one_and_accuracy_counts_their_shares(fashion_dir, mix):
    dm = ImageDataModule("fashion_mnist", 64, str(fashion_dir), **mix)
    dm.setup("fit")
    torch.manual_seed(1)
    x, y = training_batch(dm)
    labels = dm.train_set.y[:64]
    assert y.shape == (64, 10) and torch.allclose(y.sum(1), torch.ones(64))
    # each image's target is its own label and its partner's (the batch rolled by one), one weight for the batch
    own = y.gather(1, labels[:, None]).squeeze(1)
    partner = y.gather(1, labels.roll(1)[:, None]).squeeze(1)
    same = labels == labels.roll(1)
    assert torch.allclose(own[~same] + partner[~same], torch.ones(int((~same).sum())))
    assert len(set(own[~same].round(decimals=5).tolist())) == 1 and 0 < own[~same][0] < 1
    # train/acc: an image counts by the share its target gives the predicted class
    model = classifier(in_shape=(1, 28, 28))
    model._trainer = SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=False))
    model.training_step((x, y), 0)
    predictions = model(x).argmax(1)
    assert torch.allclose(model.train_hits, y.gather(1, predictions[:, None]).sum())


def test_random_erasing_boxes():
    torch.manual_seed(0)
    x = torch.ones(500, 1, 28, 28)
    black = torch.zeros(1)
    assert torch.equal(random_erasing(x, 0.0, black), x)
    erased = random_erasing(x, 1.0, black)
    zeros = erased == 0
    assert zeros.flatten(1).any(1).all()  # every image has a box
    for image in zeros[:50, 0]:  # one rectangle: its rows and columns span exactly the zeros
        rows, cols = image.any(1).nonzero().flatten(), image.any(0).nonzero().flatten()
        assert image.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    area = zeros.flatten(1).float().mean(1)
    assert area.min() > 0.01 and area.max() < 0.4 and len(set(area.tolist())) > 20  # a box per image
    half = random_erasing(x, 0.5, black)
    assert 0.4 < (half == 0).flatten(1).any(1).float().mean() < 0.6
    # the box has the given colour per channel (the data module gives its train split's mean: 0 once normalised)
    colour = torch.tensor([0.2, 0.5, 0.7])
    boxed = random_erasing(torch.ones(20, 3, 28, 28), 1.0, colour)
    assert torch.equal((boxed != 1).any(1), (boxed == colour.view(1, 3, 1, 1)).all(1))


def test_tta_on_a_symmetric_input_equals_no_tta():
    x = torch.randn(4, 1, 8, 8)
    symmetric = (x + x.flip(3)) / 2
    plain, flip = classifier().eval(), classifier(tta="flip").eval()
    with torch.no_grad():
        assert torch.allclose(flip.tta_logits(symmetric), plain.tta_logits(symmetric), atol=1e-6)
        assert not torch.allclose(flip.tta_logits(x), plain.tta_logits(x), atol=1e-4)
        both = classifier(tta="flip_translate").eval().tta_logits(x)
    assert both.shape == (4, 10) and not torch.allclose(both, flip.tta_logits(x))


@pytest.mark.slow
def test_tta_is_the_evaluating_commands_choice(tmp_path, fashion_dir):
    args = fit_args(tmp_path, fashion_dir, "--model.tta=flip_translate")
    assert invoke(args).returncode == 0
    predict = ["predict", *args[1:], "--ckpt_path=best", "--trainer.limit_predict_batches=1"]
    assert invoke(predict).returncode == 0
    with open(run_dir(tmp_path) / "predict_0" / "predictions.csv") as f:
        with_tta = list(csv.DictReader(f))
    assert len(with_tta) == 100
    # the checkpoint's hyperparameters say flip_translate; the command's flag wins
    assert invoke([*predict, "--model.tta=none"]).returncode == 0
    with open(run_dir(tmp_path) / "predict_1" / "predictions.csv") as f:
        without = list(csv.DictReader(f))
    assert [r["probability"] for r in without] != [r["probability"] for r in with_tta]


STACK = [f"--config={ROOT / 'configs/tricks' / name}.yaml"
         for name in ("ema", "label_smoothing", "mixup_cutmix", "random_erasing", "tta")]  # fmt: skip


def test_every_trick_together_trains_but_two_averages(tmp_path, fashion_dir):
    # EMA and SWA would each swap its average into the model: refused at start, nothing written
    swa = f"--config={ROOT / 'configs/tricks/swa.yaml'}"
    result = invoke([*fit_args(tmp_path, fashion_dir, "--trainer.max_epochs=2"), *STACK, swa])
    assert result.returncode == 2 and "EMA and SWA both average the weights" in result.stderr.splitlines()[-1]
    assert not list((tmp_path / "logs").glob("*/*"))
    result = invoke([*fit_args(tmp_path, fashion_dir, "--trainer.max_epochs=2"), *STACK])
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((run_dir(tmp_path) / "config.yaml").read_text())
    names = [c["class_path"].split(".")[-1] for c in config["trainer"]["callbacks"]]
    assert "EMA" in names and config["data"]["init_args"]["mixup_alpha"] == 0.2
    assert config["model"]["init_args"]["tta"] != "none"


@pytest.mark.slow
def test_stacked_tricks_and_fine_tuning_resume_to_the_uninterrupted_weights(tmp_path, fashion_dir):
    from test_faults import NOISY, fault, load

    def trained(where: Path, *extra: str) -> Path:
        where.mkdir()
        child = Child(fit_args(where, fashion_dir, *NOISY, *STACK, *extra), where / "run.log")
        assert child.wait() in (0, 143), child.output[-3000:]
        return run_dir(where)

    # and fine-tuning's: the body frozen in epoch 0 (stopped there), unfrozen in epoch 1 (after the resume); the
    # balanced sample of each epoch with the class-weighted loss; the temperature fitted at each validation
    fine = ["--model.freeze_epochs=1", "--model.train_bn=false", "--model.body_lr_scale=0.3", "--model.layer_decay=0.7",
            "--model.norm_bias_decay=false", "--data.balanced=true", "--model.class_weights=balanced",
            "--model.calibrate=true"]  # fmt: skip
    straight = load(trained(tmp_path / "straight", *fine) / "checkpoints" / "last.ckpt")
    stopped = trained(tmp_path / "stopped", *fine, fault(tmp_path / "stopped", "SIGTERM", "val0"))
    resumed = Child(["resume", str(stopped)], tmp_path / "resume.log")
    assert resumed.wait() == 0, resumed.output[-3000:]
    final = load(stopped / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "current_model_state"):  # the average and the raw weights, bit for bit
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, final[key][name]), (key, name)


@pytest.mark.slow
def test_lr_find_and_batch_size_find_write_configs_that_fit_accepts(tmp_path, fashion_dir):
    # with fine-tuning's parameter groups and frozen body (Lightning's BackboneFinetuning breaks the LR finder)
    base = [f"--data.data_dir={fashion_dir}", "--trainer.accelerator=cpu", "--data.batch_size=32",
            "--model.freeze_epochs=1", "--model.body_lr_scale=0.1", "--model.norm_bias_decay=false"]  # fmt: skip
    out = tmp_path / "lr.yaml"
    result = invoke(["lr-find", *base, "--steps=40", "--min_lr=1e-5", "--max_lr=1", f"--out={out}"])
    assert result.returncode == 0, result.stderr
    found = yaml.safe_load(out.read_text())
    lr = found["model"]["optimizer"]["init_args"]["lr"]
    assert 1e-5 < lr < 1 and "scheduler" not in found["model"]  # one learning rate: one-cycle peaks at it
    assert out.with_suffix(".png").read_bytes().startswith(PNG) and f"Wrote {out}" in result.stdout
    bs = tmp_path / "bs.yaml"
    result = invoke(["batch-size-find", *base, "--max_trials=2", f"--out={bs}"])
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(bs.read_text()) == {"data": {"batch_size": 64}}  # 32, then 64
    assert not (tmp_path / "logs").exists()  # neither wrote a run
    fit = fit_args(tmp_path, fashion_dir, f"--config={out}", f"--config={bs}")
    fit.remove("--data.batch_size=32")
    assert invoke(fit).returncode == 0
    config = yaml.safe_load((run_dir(tmp_path) / "config.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["optimizer"]["init_args"]["lr"] == lr and data["batch_size"] == 64


def test_tuners_refuse_bad_ranges(fashion_dir):
    for args, expected in ((["lr-find", "--min_lr=1", "--max_lr=0.1"], "0 < --min_lr < --max_lr"),
                           (["batch-size-find", "--max_trials=0"], "--max_trials of 1 or more")):  # fmt: skip
        result = invoke([*args, f"--data.data_dir={fashion_dir}"])
        assert result.returncode == 2 and expected in result.stderr


@pytest.mark.slow
def test_compare_with_seeds_gives_spread_intervals_and_a_test(tmp_path, fashion_dir):
    experiment = tiny_experiment(tmp_path, fashion_dir)
    (experiment / "broken.yaml").write_text("data:\n  batch_size: many\n")
    logs = tmp_path / "logs"
    args = ["compare", str(experiment), f"--logs={logs}", "--seeds=2", "--", *TINY, "--trainer.max_epochs=2"]
    result = forked(args, tmp_path / "compare.log")
    assert result.returncode == 1, result.stdout[-3000:]  # a variant failed: a row that says so, and why
    assert "tiny/broken/seed_0: FAILED, variant broken/seed_0 would not start: " in result.stdout
    for variant in ("mlp", "linear"):
        seeds = sorted(p.name for p in (logs / "tiny" / variant).iterdir() if p.is_dir())
        assert seeds == ["seed_0", "seed_1"]
        configs = [yaml.safe_load((logs / "tiny" / variant / s / "version_0" / "config.yaml").read_text())
                   for s in seeds]  # fmt: skip
        assert [c["seed_everything"] for c in configs] == [0, 1]
    with open(logs / "tiny" / "comparison.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    broken = rows.pop("broken")
    assert broken["status"].startswith("failed, variant broken/seed_0 would not start: ") and "many" in broken["status"]
    assert broken["seeds ok"] == "0"
    assert "| broken | failed, variant broken" in (logs / "tiny" / "comparison.md").read_text()
    for row in rows.values():
        mean, sd = map(float, row["test acc"].split(" +- "))
        low, high = map(float, row["test acc 95% CI"].strip("[]").split(", "))
        # t(0.975, 1 degree of freedom) = 12.706
        # the table's mean and sd are rounded to 4 decimals, which t = 12.7 magnifies
        assert low < mean < high and high - mean == pytest.approx(12.706 * sd / 2**0.5, abs=6e-4)
        assert row["seeds ok"] == "2"
    assert sorted(r["p vs best (Welch)"] == "best" for r in rows.values()) == [False, True]
    other = next(r for r in rows.values() if r["p vs best (Welch)"] != "best")
    p = other["p vs best (Welch)"]
    assert p == "<0.001" or 0.001 <= float(p) <= 1
    assert "Welch" in (logs / "tiny" / "comparison.md").read_text()
    assert (logs / "tiny" / "curves.png").read_bytes().startswith(PNG)


def test_student_t_and_welch_match_the_tables():
    from project.commands.compare import t_quantile, welch

    # t(0.975) for 1, 2 and 29 degrees of freedom, from the tables
    assert [round(t_quantile(df), 3) for df in (1, 2, 29)] == [12.706, 4.303, 2.045]
    # Welch's test on samples of unequal size and spread: the p-values scipy.stats.ttest_ind(a, b, equal_var=False)
    # gives (t = -2.251 with 5.52 degrees of freedom for the first)
    assert welch([1, 2, 3, 4], [2, 4, 6, 8, 10]) == pytest.approx(0.0691, abs=1e-4)
    assert welch([0.91, 0.92, 0.925], [0.90, 0.905, 0.899, 0.91]) == pytest.approx(0.0549, abs=1e-4)
