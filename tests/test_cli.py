import csv
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, child_env, cli, fit_args, invoke, run
from lightning.pytorch.callbacks import RichProgressBar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from project.module import ImageClassifier


def test_fit_saves_config_and_tests_the_best_checkpoint(tmp_path, fashion_dir):
    c = cli(
        fit_args(
            tmp_path,
            fashion_dir,
            "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=10",
            "--trainer.log_every_n_steps=2",
        )
    )
    run_dir = tmp_path / "logs" / "fashion_mnist_cnn" / "version_0"
    best = c.trainer.checkpoint_callback.best_model_path
    assert (
        best.startswith(str(run_dir / "checkpoints" / "best-epoch"))
        and (run_dir / "checkpoints" / "last.ckpt").exists()
    )
    assert c.trainer.ckpt_path == best  # the test after fit loaded the best checkpoint
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["init_args"]["data_dir"] == str(fashion_dir)
    logged = c.trainer.callback_metrics
    assert {"test/acc", "test/loss", "test/f1", "test/acc_top5"} <= set(logged)
    events = EventAccumulator(str(run_dir)).Reload()
    assert {
        "train/loss_step",
        "train/loss_epoch",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/acc_best",
        "val/f1",
        "test/loss",
        "test/acc",
        "lr-AdamW",
    } <= set(events.Tags()["scalars"])
    # the same numbers as testing that file on its own
    model = ImageClassifier.load_from_checkpoint(best, weights_only=True)
    again = c.trainer.test(model, datamodule=c.datamodule, verbose=False)[0]
    assert again["test/acc"] == pytest.approx(logged["test/acc"].item())
    assert logged["test/acc"] > 0.5


def test_early_stopping_stops(tmp_path, fashion_dir):
    # no accuracy gain can exceed min_delta=1: patience 1 ends the run after the second epoch
    c = cli(
        fit_args(
            tmp_path,
            fashion_dir,
            "--trainer.max_epochs=6",
            "--early_stopping.patience=1",
            "--early_stopping.min_delta=1.0",
        )
    )
    assert c.trainer.early_stopping_callback.stopped_epoch == 1
    assert c.trainer.current_epoch == 2 and c.trainer.should_stop


def test_resume_from_last_continues_the_same_run(tmp_path, fashion_dir):
    # extending a run needs an epoch-based schedule: OneCycleLR fixes the run's length when it starts
    step_lr = f"--config={ROOT / 'configs/schedulers/step.yaml'}"
    first = cli(fit_args(tmp_path, fashion_dir, step_lr, "--trainer.max_epochs=2"))
    steps = first.trainer.global_step
    resumed = cli(fit_args(tmp_path, fashion_dir, step_lr, "--trainer.max_epochs=3", "--ckpt_path=last"))
    assert resumed.trainer.global_step == steps * 3 // 2
    run_dir = tmp_path / "logs" / "fashion_mnist_cnn"
    assert [p.name for p in run_dir.iterdir()] == ["version_0"]  # same run directory, same TensorBoard run
    last = torch.load(run_dir / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == resumed.trainer.global_step


def test_binary_one_vs_rest(tmp_path, fashion_dir):
    c = cli(
        fit_args(
            tmp_path,
            fashion_dir,
            "--data.positive_class=9",
            "--trainer.limit_train_batches=40",
            "--trainer.limit_test_batches=10",
        )
    )
    assert c.model.binary and c.model.net.head[-1].out_features == 1
    # 10% of the test set is the positive class: beating 0.9 means the boots were learned
    assert c.trainer.callback_metrics["test/acc"] > 0.95


def test_predict_writes_one_row_per_test_image(tmp_path, fashion_dir):
    cli(fit_args(tmp_path, fashion_dir, "--trainer.limit_train_batches=40"))
    c = cli(
        [
            "predict",
            f"--data.data_dir={fashion_dir}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--ckpt_path=best",
        ]
    )
    # in a directory of its own inside the run it evaluates
    path = tmp_path / "logs" / "fashion_mnist_cnn" / "version_0" / "predict_0" / "predictions.csv"
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 10000 and [int(r["index"]) for r in rows] == list(range(10000))
    targets = c.datamodule.test_set.y.tolist()
    assert [int(r["target"]) for r in rows] == targets
    assert all(0.1 <= float(r["probability"]) <= 1 for r in rows)
    assert {r["class_name"] for r in rows} <= set(c.datamodule.classes)
    accuracy = sum(int(r["prediction"]) == t for r, t in zip(rows, targets, strict=True)) / 10000
    assert accuracy > 0.5


def test_configs_stack_on_the_default_and_print():
    result = invoke(["fit", "--config=configs/optimizers/sgd_nesterov.yaml", "--config=configs/schedulers/step.yaml",
                     "--print_config"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    model = config["model"]["init_args"]
    assert model["optimizer"]["class_path"] == "torch.optim.SGD"
    assert model["optimizer"]["init_args"]["nesterov"] is True
    assert model["optimizer"]["init_args"]["weight_decay"] == 0.0005  # the preset's, not AdamW's 0.05
    assert model["scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"
    assert model["scheduler_interval"] == "epoch"
    # from configs/default.yaml, the first config of every run
    assert config["data"]["init_args"]["source"] == "fashion_mnist"
    assert config["checkpoint"]["monitor"] == "val/acc" and config["early_stopping"]["patience"] == 3
    # one way to set the optimizer: no LightningCLI top-level optimizer / lr_scheduler
    assert "optimizer" not in config and "lr_scheduler" not in config


def _arguments(section: dict) -> dict:
    """A config section's arguments: those of its class (subclass mode: ``class_path`` and ``init_args``), or itself."""
    return section.get("init_args", {}) if "class_path" in section else section


def test_no_config_runs_exactly_the_default_yaml():
    plain = yaml.safe_load(invoke(["fit", "--print_config"]).stdout)
    explicit = yaml.safe_load(invoke(["fit", "--config=configs/default.yaml", "--print_config"]).stdout)
    assert plain == explicit
    default = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    for section in ("model", "data", "checkpoint", "early_stopping"):
        assert plain[section].get("class_path") == default[section].get("class_path")
        for key, value in _arguments(default[section]).items():
            resolved = _arguments(plain[section])[key]
            if isinstance(value, dict) and "class_path" in value:
                assert resolved["class_path"] == value["class_path"]
                assert value.get("init_args", {}).items() <= resolved["init_args"].items(), key
            else:
                assert resolved == value, key
    assert plain["seed_everything"] == default["seed_everything"]
    assert plain["trainer"]["max_epochs"] == default["trainer"]["max_epochs"]


def test_every_config_sets_only_what_differs_from_the_default():
    default = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        # presets stay whole wherever they are stacked (one-cycle is stepped per batch after any base)
        if path.name == "default.yaml" or {"search", "optimizers", "schedulers"} & set(path.parts[-2:-1]):
            continue
        config = yaml.safe_load(path.read_text()) or {}
        assert "seed_everything" not in config, path  # one home: configs/default.yaml
        for section, values in config.items():
            for key, value in (values or {}).items() if isinstance(values, dict) else ():
                if key in ("net", "optimizer", "scheduler", "logger", "callbacks") or section not in default:
                    continue
                repeated = _arguments(default[section]).get(key, object()) == value
                assert not repeated, f"{path}: {section}.{key} repeats the default"


def test_top_level_optimizer_flags_do_not_exist():
    result = invoke(["fit", "--optimizer=torch.optim.SGD"])
    assert result.returncode == 2 and "--optimizer" in result.stderr


PRESETS = sorted((ROOT / "configs" / "optimizers").glob("*.yaml")) + sorted(
    (ROOT / "configs" / "schedulers").glob("*.yaml")
)


@pytest.mark.parametrize("preset", PRESETS, ids=[f"{p.parent.name}/{p.stem}" for p in PRESETS])
def test_every_optimizer_and_scheduler_preset_builds_and_steps(tmp_path, fashion_dir, preset):
    c = cli(
        fit_args(
            tmp_path,
            fashion_dir,
            f"--config={preset}",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=false",  # the optimizer and its schedule are the subject, not the report
            f"--trainer.default_root_dir={tmp_path / 'logs'}",
        )
    )
    spec = _arguments(yaml.safe_load(preset.read_text())["model"])
    optimizer = c.trainer.optimizers[0]
    if "optimizer" in spec:
        assert type(optimizer).__name__ == spec["optimizer"]["class_path"].rsplit(".", 1)[1]
        for key, value in spec["optimizer"]["init_args"].items():
            assert optimizer.defaults[key] == (tuple(value) if isinstance(value, list) else value)
    assert c.trainer.global_step == 6
    schedulers = c.trainer.lr_scheduler_configs
    if "scheduler" in spec and spec["scheduler"] is None:
        assert schedulers == []
        return
    config = schedulers[0]
    # an optimizer preset keeps the default config's one-cycle schedule
    scheduler = spec.get("scheduler", {"class_path": "project.schedulers.OneCycleLR"})
    assert type(config.scheduler).__name__ == scheduler["class_path"].rsplit(".", 1)[1]
    assert config.interval == spec.get("scheduler_interval", "step")
    assert config.scheduler.last_epoch == (6 if config.interval == "step" else 2)
    if isinstance(config.scheduler, torch.optim.lr_scheduler.OneCycleLR):  # one learning rate: one-cycle peaks at it
        assert [g["max_lr"] for g in optimizer.param_groups] == [optimizer.defaults["lr"]]


def test_debug_preset_runs_one_batch_and_writes_nothing(tmp_path, fashion_dir):
    root = tmp_path / "root"
    debug = f"--config={ROOT / 'configs/trainer/debug.yaml'}"
    c = cli(fit_args(tmp_path, fashion_dir, debug, f"--trainer.default_root_dir={root}"))
    assert c.trainer.global_step == 1 and "test/acc" in c.trainer.callback_metrics
    assert not (tmp_path / "logs").exists() and not root.exists()


def _error(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data.source=imagenet"], ["data.source", "imagenet", "mnist", "fashion_mnist", "cifar10"]),
        (["--model.net=project.models.Transformer"], ["project.models.Transformer"]),
        (["--model.optimizer=torch.optim.Sgd"], ["torch.optim.Sgd"]),
        (["--trainer.max_epoch=3"], ["max_epoch"]),
        (["--trainer.max_epochs=three"], ["max_epochs", "three"]),
    ],
    ids=["unknown-dataset", "unknown-model", "unknown-optimizer", "bad-key", "bad-type"],
)
def test_bad_config_exits_2_with_a_message(args, expected):
    result = invoke(["fit", "--trainer.logger.init_args.save_dir=/nonexistent", *args])
    assert result.returncode == 2
    message = _error(result)
    assert all(part in message for part in expected), message


def test_bad_key_in_a_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batchsize: 64\n")
    result = invoke(["fit", f"--config={bad}"])
    assert result.returncode == 2 and "batchsize" in _error(result)


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--checkpoint.monitor=val/accuracy"],
            "checkpoint.monitor='val/accuracy' is never logged; choose one of",
        ),
        (["--ckpt_path=/nowhere/x.ckpt"], "--ckpt_path /nowhere/x.ckpt: no such file."),
        (["--data.val_size=60000"], "data.val_size=60000 leaves no training images"),
    ],
    ids=["monitor-never-logged", "missing-ckpt", "impossible-split"],
)
def test_impossible_settings_exit_2_with_one_line(tmp_path, fashion_dir, args, expected):
    result = invoke([*fit_args(tmp_path, fashion_dir), *args])
    assert result.returncode == 2
    lines = _error(result).strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_gpu_config_on_a_machine_without_one_says_so_in_one_line(tmp_path, fashion_dir):
    result = invoke([*fit_args(tmp_path, fashion_dir, config="configs/fashion_mnist_gpu.yaml"),
                     "--trainer.accelerator=gpu"])  # fmt: skip
    assert result.returncode == 2
    (line,) = _error(result).strip().splitlines()
    assert line.startswith("error: this config asks for a GPU") and "configs/trainer/cpu.yaml" in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["nonsense"], "unknown command 'nonsense'"),
        (["resume"], "usage: python -m project resume"),
        (["resume", "logs/nowhere/version_0"], "config.yaml does not exist"),
        (["lr-plot", "configs/nowhere"], "configs/nowhere is not a directory"),
        (["compare", "configs/nowhere"], "no such config file or experiment directory: configs/nowhere"),
        (["compare", "configs/default.yaml", "configs/nowhere.yaml"], "experiment directory: configs/nowhere.yaml"),
    ],
    ids=["unknown-command", "resume-no-run", "resume-missing", "lr-plot-no-dir", "compare-no-dir", "compare-no-file"],
)
def test_every_command_answers_a_user_error_with_one_paragraph(args, expected):
    result = invoke(args)
    assert result.returncode == 2
    (line,) = _error(result).strip().splitlines()
    assert line.startswith("error: ") and expected in line


def test_help_lists_every_command():
    result = invoke(["--help"])
    assert result.returncode == 0
    for command in ("fit", "validate", "test", "predict", "resume", "compare", "lr-plot", "search"):
        assert f"  {command} " in result.stdout


@pytest.mark.slow
def test_the_installed_script_is_the_same_entry_point():
    script = Path(sys.executable).parent / "project"
    result = subprocess.run([script, "compare", "--help"], capture_output=True, text=True, env=child_env())
    assert result.returncode == 0 and "usage: python -m project compare" in result.stdout, result.stderr
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "project"]
    assert entry.value == "project.__main__:main"  # every command, as python -m project runs them


@pytest.mark.slow
def test_fit_with_no_config_runs_the_default_and_prints_nothing_a_user_cannot_act_on(tmp_path, fashion_dir):
    # as `python -m project fit` runs in a log file (no terminal): the default config, one batch of each stage
    result = run(["fit", "--trainer.fast_dev_run=true", f"--data.data_dir={fashion_dir}", "--trainer.accelerator=cpu"],
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in ("Traceback", "Warning", "warn", "Tip", "already configured", "…"):
        assert noise not in output, output
    assert "| net.features " in output and "| ConvNet " in output  # the summary, readable in a log file
    assert "test/acc" in output


def test_progress_bar_shows_no_version_number(tmp_path, fashion_dir):
    c = cli(fit_args(tmp_path, fashion_dir, "--trainer.enable_progress_bar=true"))
    bar = c.trainer.progress_bar_callback
    # Lightning's shows the version's last four characters ("v_num: on_0") as if it were a metric
    assert RichProgressBar.get_metrics(bar, c.trainer, c.model) == {"v_num": "on_0"}
    assert bar.get_metrics(c.trainer, c.model) == {}
