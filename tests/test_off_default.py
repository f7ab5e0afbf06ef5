"""One step off the default: every logger Lightning ships, checkpoint and validation flags, flags given to resume; the
run directory, the newest run, evaluations and resume hold for each."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY, invoke

pytestmark = pytest.mark.slow  # each case fits, resumes and evaluates a run

QUICK = [a for a in TINY if "max_epochs" not in a]


def _logger(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


BOTH = [_logger("lightning.pytorch.loggers.CSVLogger", save_dir="logs", name="both"),
        _logger("project.logger.TensorBoardLogger", save_dir="logs", name="both")]  # fmt: skip
# logger -> the arguments that choose it, and where its runs go (relative to the test's directory)
LOGGERS = {
    "tensorboard": ([], "logs/fashion_mnist_cnn"),
    "csv": (["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.name=csv"],
            "logs/csv"),
    "none": (["--trainer.logger=false"], "runs"),
    # MLflow 3 refuses its old file store: a database store, as its own message says
    "mlflow": (["--trainer.logger=lightning.pytorch.loggers.MLFlowLogger",
                "--trainer.logger.init_args.tracking_uri=sqlite:///{tmp}/mlflow.db"], "runs"),
    "wandb-offline": (["--trainer.logger=lightning.pytorch.loggers.WandbLogger",
                       "--trainer.logger.init_args.offline=true"], "runs"),
    "csv-and-tensorboard": ([f"--trainer.logger={json.dumps(BOTH)}"], "logs/both"),
}  # fmt: skip


def base(tmp_path: Path, fashion_dir: Path, *extra: str) -> list[str]:
    """A tiny run whose every directory is under ``tmp_path``, whatever the logger."""
    return [f"--config={ROOT / 'configs/schedulers/cosine.yaml'}", f"--data.data_dir={fashion_dir}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--trainer.default_root_dir={tmp_path / 'runs'}", *QUICK, *extra]  # fmt: skip


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """The test's directory as the working directory: the loggers' own stores (mlruns/, wandb/) go there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def ok(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.mark.parametrize("logger", LOGGERS)
def test_every_promise_of_a_run_holds_for_every_logger(here, fashion_dir, logger):
    chosen, where = LOGGERS[logger]
    chosen = [a.replace("{tmp}", str(here)) for a in chosen]
    fit = ["fit", *base(here, fashion_dir, *chosen, "--trainer.max_epochs=1")]
    ok(invoke(fit))
    versions = ["version_0"]
    if logger in ("csv", "none"):  # a second run gets a directory of its own, claimed (the same code for every logger)
        ok(invoke(fit))
        versions.append("version_1")
    root = here / where
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == versions, list(root.iterdir())
    run = root / versions[-1]
    assert {"config.yaml", "run.json", "record.csv", "checkpoints"} <= {p.name for p in run.iterdir()}
    assert [p.name for p in (run / "checkpoints").glob("last*")] == ["last.ckpt"]
    with open(run / "record.csv") as f:
        assert [row["stage"] for row in csv.DictReader(f)] == ["fit", "test"]
    # the newest run's best checkpoint, evaluated into a directory of its own inside the run
    ok(invoke(["test", *base(here, fashion_dir, *chosen), "--ckpt_path=best"]))
    assert (run / "test_0" / "config.yaml").is_file() and not (root / "version_2").exists()
    if len(versions) == 2:  # and with the older run's own config, that run's best
        ok(invoke(["test", f"--config={root / 'version_0' / 'config.yaml'}", "--ckpt_path=best"]))
        assert (root / "version_0" / "test_0").is_dir() and not (run / "test_1").exists()
    # resumed into the same directory, with a flag it honours and records
    ok(invoke(["resume", str(run), "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"]))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == versions
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[0]["torch"]["version"] == torch.__version__
    assert sessions[0]["data"]["md5"]  # the files it trained on, by checksum


# flags that change when checkpoints are written or validation runs -> what else the check needs
FLAGS = {
    "save_last-false": ["--checkpoint.save_last=false"],
    "dirpath-elsewhere-save_top_k-0": ["--checkpoint.dirpath={tmp}/elsewhere", "--checkpoint.save_top_k=0"],
    "save_top_k-all-every_n_epochs-2-check_val_every_n_epoch-2": ["--checkpoint.save_top_k=-1",
                                                                   "--checkpoint.every_n_epochs=2",
                                                                   "--trainer.check_val_every_n_epoch=2"],
    "val_check_interval-half": ["--trainer.val_check_interval=0.5"],
}  # fmt: skip


@pytest.mark.parametrize("flag", FLAGS)
def test_checkpoint_and_validation_flags_keep_what_the_run_trained(here, fashion_dir, flag):
    flags = [f.format(tmp=here) for f in FLAGS[flag]]
    fit = ["fit", *base(here, fashion_dir, *flags)]
    ok(invoke([*fit, "--trainer.max_epochs=1"]))
    run = here / "logs" / "fashion_mnist_cnn" / "version_0"
    checkpoints = here / "elsewhere" if "dirpath" in flag else run / "checkpoints"
    written = {p.name: torch.load(p, weights_only=True) for p in checkpoints.glob("*.ckpt")}
    assert written and all(c["global_step"] == 4 for c in written.values()), (flag, written.keys())  # the epoch's end
    assert ("last.ckpt" in written) == (flag != "save_last-false")
    evaluate = ["test", *base(here, fashion_dir, *flags)]
    # no best checkpoint where none is kept, or before the first validation (or top-k save) of every second epoch
    no_best = "save_top_k-0" in flag or "every_n_epochs-2" in flag
    for which in ("last", "best"):
        result = invoke([*evaluate, f"--ckpt_path={which}"])
        if which == "last" and flag == "save_last-false":
            assert result.returncode == 2 and "checkpoint.save_last false" in result.stderr
        elif which == "best" and no_best:
            assert result.returncode == 2 and "holds no best checkpoint" in result.stderr
        else:
            ok(result)
    # resumed from where it was, not from its first step, and ends where a run of two epochs ends
    ok(invoke(["resume", str(run), "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"]))
    newest = max(checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert torch.load(newest, weights_only=True)["global_step"] == 8


def test_resume_honours_or_refuses_each_flag(here, fashion_dir):
    ok(invoke(["fit", *base(here, fashion_dir, "--trainer.max_epochs=1")]))
    run = here / "logs" / "fashion_mnist_cnn" / "version_0"
    before = (run / "config.yaml").read_bytes()
    resume = ["resume", str(run), "--trainer.enable_progress_bar=false"]
    for refused, key in ((["--model.optimizer.init_args.lr=0.5"], "model.optimizer"),
                         (["--model.net.init_args.widths=[8,16,32]"], "model.net"),
                         (["--model.scheduler=null"], "model.scheduler"),
                         (["--model=project.module.ImageClassifier", "--model.optimizer=torch.optim.SGD"],
                          "model.optimizer")):  # fmt: skip
        result = invoke([*resume, *refused, "--model.label_smoothing=0.2"])
        assert result.returncode == 2 and f"{key} cannot change when a run goes on" in result.stderr, result.stderr
        assert (run / "config.yaml").read_bytes() == before  # refused: the run as it was
    # honoured and recorded: the loss, early stopping's patience, the Trainer's flags
    honoured = ["--model.label_smoothing=0.2", "--early_stopping.patience=7", "--trainer.max_epochs=2"]
    ok(invoke([*resume, *honoured]))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["label_smoothing"] == 0.2 and saved["early_stopping"]["patience"] == 7
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["hyper_parameters"]["label_smoothing"] == 0.2 and last["global_step"] == 8
    early = next(s for k, s in last["callbacks"].items() if k.startswith("EarlyStopping"))
    assert early["patience"] == 7


def test_the_newest_run_is_the_one_trained_last_whatever_its_name(here, fashion_dir):
    ok(invoke(["fit", *base(here, fashion_dir, "--trainer.max_epochs=1", "--trainer.logger.init_args.version=final")]))
    ok(invoke(["fit", *base(here, fashion_dir, "--trainer.max_epochs=1")]))
    ok(invoke(["resume", str(here / "logs" / "fashion_mnist_cnn" / "final"), "--trainer.max_epochs=2",
               "--trainer.enable_progress_bar=false"]))  # fmt: skip
    ok(invoke(["test", *base(here, fashion_dir), "--ckpt_path=last"]))
    # "final" trained last: its last checkpoint is the one tested, whatever the digits in version_0 say
    assert (here / "logs" / "fashion_mnist_cnn" / "final" / "test_0").is_dir()
    assert not (here / "logs" / "fashion_mnist_cnn" / "version_0" / "test_0").exists()
    # with a run's own config, last is that run's, not the newest run's
    config = here / "logs" / "fashion_mnist_cnn" / "version_0" / "config.yaml"
    ok(invoke(["test", f"--config={config}", "--ckpt_path=last"]))
    assert (config.parent / "test_0").is_dir() and not (
        here / "logs" / "fashion_mnist_cnn" / "final" / "test_1"
    ).exists()
