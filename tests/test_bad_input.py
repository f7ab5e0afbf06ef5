"""What a user can get wrong gets one paragraph and an exit code, and evaluating a run never changes it."""

import csv
import gzip
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import fit_args, forked, invoke
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from project.data import DATASETS


def run_dir(tmp_path: Path, name: str = "fashion_mnist_cnn") -> Path:
    return tmp_path / "logs" / name / "version_0"


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def one_paragraph(result, code: int) -> str:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    return message


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, fashion_dir) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    assert invoke(fit_args(tmp, fashion_dir, "--trainer.max_epochs=2")).returncode == 0
    return tmp / "logs"


@pytest.fixture
def trained(tmp_path, trained_once) -> Path:
    """A finished two-epoch run, a copy of its own in this test's logs/."""
    shutil.copytree(trained_once, tmp_path / "logs")
    return run_dir(tmp_path)


def eval_args(tmp_path: Path, fashion_dir: Path, command: str, *extra: str) -> list[str]:
    return [command, "--ckpt_path=best", f"--data.data_dir={fashion_dir}", "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.enable_progress_bar=false",
            "--trainer.limit_test_batches=2", "--trainer.limit_val_batches=2", "--trainer.limit_predict_batches=2",
            *extra]  # fmt: skip


@pytest.mark.slow
def test_validate_test_and_predict_leave_the_run_as_it_was_trained(tmp_path, fashion_dir, trained):
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    for command in ("test", "validate", "predict", "test"):
        result = invoke(eval_args(tmp_path, fashion_dir, command, "--trainer.max_epochs=7", "--data.batch_size=16"))
        assert result.returncode == 0, result.stderr[-2000:]
    assert {p: p.read_bytes() for p in before} == before  # config.yaml, events, checkpoints: byte for byte
    # each writes a directory of its own inside the run, with the config it ran
    assert sorted(p.name for p in trained.iterdir() if p.is_dir()) == [
        "checkpoints", "predict_0", "test_0", "test_1", "validate_0"]  # fmt: skip
    assert (trained / "predict_0" / "predictions.csv").is_file()
    assert "test/acc" in EventAccumulator(str(trained / "test_1")).Reload().Tags()["scalars"]
    # and the run goes on as before: resume, and fit --config with its saved config
    assert invoke(["resume", str(trained)]).returncode == 0
    again = invoke([*fit_args(tmp_path, fashion_dir), f"--config={trained / 'config.yaml'}"])
    assert again.returncode == 0, again.stderr[-2000:]


def test_tensorboard_has_each_metric_once_per_step(tmp_path, fashion_dir, trained):
    events = EventAccumulator(str(trained), size_guidance={"scalars": 0}).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in ("val/acc", "val/acc_best", "test/acc")}
    assert steps["val/acc_best"] == steps["val/acc"] and len(steps["val/acc"]) == 2  # one point a validation
    assert steps["test/acc"] == [8]  # once, after training's 8 steps: not again at step 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data.val_size=59999"], "data.batch_size=32 is more than the 1 training images that data.val_size=59999"),
        (["--data.batch_size=100000"], "data.batch_size=100000 is more than the 55000 training images"),
        (["--trainer.max_epochs=0"], "trainer.max_epochs=0 trains nothing"),
        (["--trainer.max_epochs=-5"], "trainer.max_epochs=-5 trains nothing"),
        (["--predictions.top_k=0"], "predictions.top_k=0: give 1 or more"),
        (
            ["--model.scheduler.init_args.total_steps=3"],
            "model.scheduler OneCycleLR runs 3 steps, and the Trainer trains 4 steps",
        ),
        (["--trainer.max_epochs=-1"], "OneCycleLR is planned over the run's length, and this run has none"),
    ],
    ids=[
        "val-size-takes-all",
        "batch-larger-than-data",
        "zero-epochs",
        "negative-epochs",
        "top-k",
        "short-one-cycle",
        "endless-one-cycle",
    ],
)
def test_a_run_that_cannot_train_stops_before_it_starts(tmp_path, fashion_dir, args, expected):
    message = one_paragraph(invoke(fit_args(tmp_path, fashion_dir, *args)), 2)
    assert expected in message
    assert not list(tmp_path.glob("logs/*/*/checkpoints/*.ckpt"))


def test_an_empty_config_file_is_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert f"{empty} is empty" in one_paragraph(invoke(["fit", f"--config={empty}"]), 2)
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: {3\ndata:\n")
    message = one_paragraph(invoke(["fit", f"--config={broken}"]), 2)
    assert f"{broken} is not valid YAML: expected ',' or '}}', but got ':' at line 3, column 5" in message
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    assert "binary.yaml is not a text file" in one_paragraph(invoke(["fit", f"--config={tmp_path / 'binary.yaml'}"]), 2)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "(0 bytes): it is empty"),
        (b"not a checkpoint\n", "(17 bytes): it is not a PyTorch file"),
        (bytes(range(256)) * 8, "(2048 bytes): it is not a PyTorch file"),
        ("truncated", "it is truncated or corrupt"),
    ],
    ids=["empty", "text", "random", "truncated"],
)
def test_a_bad_checkpoint_file_is_refused_with_one_message(tmp_path, fashion_dir, trained, content, expected):
    bad = tmp_path / "bad.ckpt"
    last = (trained / "checkpoints" / "last.ckpt").read_bytes()
    bad.write_bytes(last[: len(last) // 2] if content == "truncated" else content)
    for command in ("test", "predict", "validate"):
        message = one_paragraph(invoke([*eval_args(tmp_path, fashion_dir, command), f"--ckpt_path={bad}"]), 2)
        assert message.startswith(f"error: {bad} is not a checkpoint that can be read") and expected in message
    message = one_paragraph(invoke([*fit_args(tmp_path, fashion_dir), f"--ckpt_path={bad}"]), 2)
    assert expected in message


def test_best_when_the_newest_last_checkpoint_is_truncated(tmp_path, fashion_dir, trained):
    last = trained / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    message = one_paragraph(invoke(eval_args(tmp_path, fashion_dir, "test")), 2)
    assert f"{last} is not a checkpoint that can be read" in message


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent/pwned"),))


def test_a_checkpoint_holding_arbitrary_pickle_is_refused(tmp_path, fashion_dir, trained):
    good = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)  # plain types only
    assert {"rng_states", "state_dict", "callbacks", "loops"} <= set(good)
    evil = tmp_path / "evil.ckpt"
    torch.save({**good, "extra": _Payload()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    message = one_paragraph(invoke([*eval_args(tmp_path, fashion_dir, "test"), f"--ckpt_path={evil}"]), 2)
    assert message.startswith(f"error: {evil} holds objects other than tensors and plain types")
    assert "weights_only=False" in message


def test_a_checkpoint_of_other_data_is_refused(tmp_path, fashion_dir):
    binary = fit_args(tmp_path, fashion_dir, "--data.positive_class=3", "--trainer.logger.init_args.name=binary")
    assert invoke(binary).returncode == 0
    last = run_dir(tmp_path, "binary") / "checkpoints" / "last.ckpt"
    message = one_paragraph(invoke([*eval_args(tmp_path, fashion_dir, "test"), f"--ckpt_path={last}"]), 2)
    assert f"{last} was trained on the 2 classes not Dress, Dress; the data now has 10: T-shirt/top" in message


class WrongShape(torch.nn.Module):
    def __init__(self, in_shape, num_outputs):
        super().__init__()
        self.linear = torch.nn.Linear(784, 7)

    def forward(self, x):
        return self.linear(x.flatten(1))


class WrongArguments(torch.nn.Module):
    def __init__(self, channels: int = 3):
        super().__init__()


class Fails(torch.nn.Module):
    def __init__(self, in_shape, num_outputs):
        super().__init__()
        self.linear = torch.nn.Linear(100, num_outputs)

    def forward(self, x):
        return self.linear(x.flatten(1))


@pytest.mark.parametrize(
    "net, expected",
    [
        ("WrongShape", "returns (2, 7) for 2 images of shape (1, 28, 28); expected logits of shape (2, 10)"),
        ("WrongArguments", "cannot be built as test_bad_input.WrongArguments(in_shape=(1, 28, 28), num_outputs=10)"),
        ("Fails", "fails on a batch of images of shape (1, 28, 28): mat1 and mat2 shapes cannot be multiplied"),
    ],
)
def test_a_net_that_does_not_fit_the_data_is_named_at_setup(tmp_path, fashion_dir, net, expected):
    message = one_paragraph(invoke(fit_args(tmp_path, fashion_dir, f"--model.net={__name__}.{net}")), 2)
    assert f"model.net {__name__}.{net}" in message and expected in message


NO_DOWNLOAD = ["--data.source=project.data.Builtin", "--data.source.name=fashion_mnist", "--data.source.download=false"]


def _fashion_copy(tmp_path: Path, fashion_dir: Path) -> Path:
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in DATASETS["fashion_mnist"].md5:
        (raw / name).write_bytes((fashion_dir / "FashionMNIST" / "raw" / name).read_bytes())
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("content", ["truncated", "random", "empty"])
def test_a_bad_gz_in_the_data_folder_is_named_and_the_fix_works(tmp_path, fashion_dir, content):
    raw = _fashion_copy(tmp_path, fashion_dir)
    images = raw / "t10k-images-idx3-ubyte"
    gz = raw / "t10k-images-idx3-ubyte.gz"
    whole = gzip.compress(images.read_bytes(), compresslevel=1)
    gz.write_bytes({"truncated": whole[:5000], "random": bytes(range(256)) * 40, "empty": b""}[content])
    images.unlink()
    args = fit_args(tmp_path, tmp_path / "data", *NO_DOWNLOAD)
    message = one_paragraph(invoke(args), 1)
    assert f"{gz} is not a complete gzip file" in message and "Delete it and run again" in message
    assert not list(raw.glob(".*.tmp"))  # nothing half-written left behind
    if content == "truncated":  # the remedy, once: as the message says, then the Debian copy is used
        gz.unlink()
        assert invoke(args).returncode == 0


def test_a_corrupt_file_names_its_gz_too(tmp_path, fashion_dir):
    raw = _fashion_copy(tmp_path, fashion_dir)
    labels = raw / "t10k-labels-idx1-ubyte"
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels.read_bytes()[:-10]))
    labels.write_bytes(labels.read_bytes()[:-10])
    message = one_paragraph(invoke(fit_args(tmp_path, tmp_path / "data", *NO_DOWNLOAD)), 1)
    assert f"Delete it (and {labels}.gz, which it came from) and run again" in message


def test_a_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("")
    message = one_paragraph(invoke(fit_args(tmp_path, tmp_path / "data")), 1)
    assert f"data.data_dir {tmp_path / 'data'} is a file, not a directory" in message


def test_a_logs_path_that_is_a_file(tmp_path, fashion_dir):
    (tmp_path / "logs").write_text("")
    message = one_paragraph(invoke(fit_args(tmp_path, fashion_dir)), 1)
    assert "Not a directory" in message and "trainer.logger.init_args.save_dir" in message


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint(tmp_path, fashion_dir):
    limit = json.dumps({"class_path": "helpers.FileSizeLimit", "init_args": {"limit": 200_000}})
    result = forked(fit_args(tmp_path, fashion_dir, f"--trainer.callbacks+={limit}"), tmp_path / "run.log")
    checkpoints = run_dir(tmp_path) / "checkpoints"
    assert result.returncode == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    assert f"error: could not write {checkpoints}/best-epoch000.ckpt: File too large" in result.stdout
    assert f"the last good checkpoint is {checkpoints / 'last.ckpt'}" in result.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # no temporary file left
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 0  # the one written at start


def test_a_moved_run_resumes_where_it_now_is(tmp_path, trained, trained_once):
    original = {p.name for p in (trained_once / "fashion_mnist_cnn" / "version_0").iterdir()}
    moved = tmp_path / "elsewhere" / "version_0"
    moved.parent.mkdir()
    trained.rename(moved)  # its config.yaml still names the directory it was trained in
    result = invoke(["resume", str(moved)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(moved.glob("events.out.tfevents.*"))) > len(list(trained_once.glob("*/version_0/events.*")))
    assert {p.name for p in (trained_once / "fashion_mnist_cnn" / "version_0").iterdir()} == original


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluating_needs_a_checkpoint(tmp_path, fashion_dir, command):
    # without one, Lightning would evaluate the untrained net and print its accuracy as a result
    args = [a for a in eval_args(tmp_path, fashion_dir, command) if not a.startswith("--ckpt_path")]
    message = one_paragraph(invoke(args), 2)
    assert f"{command} evaluates a trained model: give --ckpt_path best" in message
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_resume_cannot_stretch_one_cycle_and_keeps_the_config(tmp_path, trained):
    config = (trained / "config.yaml").read_bytes()
    checkpoints = {p: p.read_bytes() for p in (trained / "checkpoints").iterdir()}
    message = one_paragraph(invoke(["resume", str(trained), "--trainer.max_epochs=3"]), 2)
    assert "one-cycle schedule was planned for 8 steps, and the trainer flags now train 12 steps" in message
    assert (trained / "config.yaml").read_bytes() == config  # the failed resume's override is not the run's config
    assert {p: p.read_bytes() for p in (trained / "checkpoints").iterdir()} == checkpoints
    assert invoke(["resume", str(trained)]).returncode == 0  # the run as it was: finished, tested again
    # a resume with nothing left to train (its epochs done) is tested again, and its flags are not the run's config
    assert invoke(["resume", str(trained), "--trainer.max_epochs=1"]).returncode == 0
    assert (trained / "config.yaml").read_bytes() == config


def test_a_resume_that_trains_longer_saves_its_config(tmp_path, fashion_dir):
    cosine = fit_args(tmp_path, fashion_dir, config="configs/schedulers/cosine.yaml")
    assert invoke(cosine).returncode == 0
    run = run_dir(tmp_path)
    assert invoke(["resume", str(run), "--trainer.max_epochs=2"]).returncode == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_predicting_files_needs_no_dataset(tmp_path, fashion_dir, trained):
    # the checkpoint and the built-in dataset's description say how to resize and normalise: nothing is prepared
    from torchvision.io import write_png

    write_png(torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8), str(tmp_path / "photo.png"))
    empty = tmp_path / "elsewhere"
    args = eval_args(tmp_path, empty, "predict", f"--data.predict_files={tmp_path / 'photo.png'}")
    result = invoke(args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not empty.exists()
    (row,) = csv.DictReader((trained / "predict_0" / "predictions.csv").read_text().splitlines())
    assert row["file"] == str(tmp_path / "photo.png") and row["class_name"] in DATASETS["fashion_mnist"].classes


@pytest.mark.slow
def test_a_run_resumed_by_another_path_or_moved_keeps_one_last_and_one_best(tmp_path, fashion_dir, monkeypatch):
    cosine = fit_args(tmp_path, fashion_dir, config="configs/schedulers/cosine.yaml")
    assert invoke(cosine).returncode == 0

    def checkpoints(run: Path) -> dict[str, int]:
        return {p.name: load(p)["epoch"] for p in (run / "checkpoints").iterdir()}

    # by a relative path from the directory above the logs (the checkpoint's state holds the absolute one)
    monkeypatch.chdir(tmp_path)
    assert invoke(["resume", "logs/fashion_mnist_cnn/version_0", "--trainer.max_epochs=2"]).returncode == 0
    saved = checkpoints(run_dir(tmp_path))
    assert saved["last.ckpt"] == 1 and len(saved) == 2, saved  # last.ckpt rewritten, no last-v1.ckpt beside it
    # moved, then trained further: the files it knew are still its own (the older best is replaced, not left over)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    run_dir(tmp_path).rename(moved)
    assert invoke(["resume", str(moved), "--trainer.max_epochs=3"]).returncode == 0
    saved = checkpoints(moved)
    assert saved["last.ckpt"] == 2 and len(saved) == 2, saved
    # fewer epochs than the run has trained: Lightning's MisconfigurationException, as one message; nothing written
    message = one_paragraph(invoke(["resume", str(moved), "--trainer.max_epochs=1"]), 2)
    assert "Lightning cannot run this as set" in message and "current_epoch=2" in message
    assert checkpoints(moved) == saved and "max_epochs: 3" in (moved / "config.yaml").read_text()


def test_one_run_is_trained_by_one_process_at_a_time(tmp_path, trained):
    import fcntl
    import os

    fd = os.open(trained / "checkpoints", os.O_RDONLY)  # as a resume running elsewhere holds it
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        message = one_paragraph(invoke(["resume", str(trained)]), 1)
        assert f"{trained} is being trained by another process right now" in message
    finally:
        os.close(fd)
    assert invoke(["resume", str(trained)]).returncode == 0


def test_mistakes_on_a_trained_run_leave_it_as_it_was(tmp_path, fashion_dir, trained):
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    # an evaluation that cannot start leaves no directory of its own in the run
    one_paragraph(invoke(eval_args(tmp_path, fashion_dir, "predict", "--predictions.top_k=0")), 2)
    one_paragraph(invoke(eval_args(tmp_path, fashion_dir, "test", "--data.batch_size=0")), 2)
    message = one_paragraph(invoke(eval_args(tmp_path, fashion_dir, "predict", "--data.predict_files=")), 2)
    assert "data.predict_files is empty" in message
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in trained.iterdir() if p.is_dir()) == ["checkpoints"]


def test_a_preset_stacked_twice_adds_its_callback_once(tmp_path, fashion_dir):
    ema = "--config=configs/tricks/ema.yaml"
    assert (
        invoke(fit_args(tmp_path, fashion_dir, ema, ema, "--trainer.callbacks+=project.averaging.EMA")).returncode == 0
    )
    callbacks = load(run_dir(tmp_path) / "checkpoints" / "last.ckpt")["callbacks"]
    assert len([k for k in callbacks if "EMA" in k]) == 1, list(callbacks)
