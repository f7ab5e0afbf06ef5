"""Faults provoked for real: kill -9, SIGTERM, Ctrl+C, exploding losses, NaN metrics, corrupt files, unsafe pickles."""

import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import OFFLINE, ROOT, cli, fit_args, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from project.checkpoint import AtomicCheckpointIO
from project.data import registry
from project.errors import DataError, NonFiniteError

# shuffling, dropout and random crops/flips all draw from the RNGs that a resume must restore
NOISY = [
    "--trainer.max_epochs=4",
    "--trainer.limit_train_batches=40",
    "--trainer.limit_val_batches=5",
    "--model.net.init_args.dropout=0.3",
    "--data.crop_padding=2",
    "--data.hflip=true",
]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "project", *args], cwd=ROOT, env=env, stdout=out, stderr=out)


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, min_step: int = 1, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if path.exists():
            ckpt = torch.load(path, weights_only=True, map_location="cpu")
            if ckpt["global_step"] >= min_step:
                return ckpt
        time.sleep(0.02)
    raise TimeoutError(path)


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "fashion_mnist_cnn" / "version_0"


def last_ckpt(tmp_path: Path) -> dict:
    return torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def scalars(directory: Path, tag: str) -> list[float]:
    return [e.value for e in EventAccumulator(str(directory)).Reload().Scalars(tag)]


def test_kill_9_then_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, fashion_dir):
    a, b = tmp_path / "uninterrupted", tmp_path / "killed"
    whole = start(fit_args(a, fashion_dir, *NOISY), tmp_path / "a.log")
    killed = start(fit_args(b, fashion_dir, *NOISY), tmp_path / "b.log")
    epoch_end = wait_for_checkpoint(killed, run_dir(b) / "checkpoints" / "last.ckpt")
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    assert epoch_end["epoch"] == 0 and epoch_end["global_step"] == 40
    assert whole.wait() == 0, (tmp_path / "a.log").read_text()[-2000:]

    resumed = run(fit_args(b, fashion_dir, *NOISY, "--ckpt_path=last"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in run_dir(b).parent.iterdir()] == ["version_0"]  # the same run directory

    expected, actual = last_ckpt(a), last_ckpt(b)
    assert actual["global_step"] == expected["global_step"] == 160
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, actual["state_dict"][name]), name
    for tag in ("test/acc", "test/loss"):
        assert scalars(run_dir(a), tag) == scalars(run_dir(b), tag)
    # the resumed TensorBoard run holds every epoch once the restart's repeats are read
    assert len(set(scalars(run_dir(b), "val/acc"))) >= 3


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, fashion_dir, signum, code):
    proc = start(fit_args(tmp_path, fashion_dir, *NOISY), tmp_path / "run.log")
    epoch_end = wait_for_checkpoint(proc, run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == code
    output = (tmp_path / "run.log").read_text()
    assert f"Stopped by {signal.Signals(signum).name}" in output
    assert f"Resume with: python -m project resume {run_dir(tmp_path)}" in output
    interrupted = last_ckpt(tmp_path)
    assert interrupted["global_step"] > epoch_end["global_step"]  # the batches since the epoch end were kept

    # the documented short form resumes in the same run and finishes the planned 4 epochs
    resumed = run(["resume", str(run_dir(tmp_path))])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert last_ckpt(tmp_path)["epoch"] == 3 and "test/acc" in resumed.stdout


def test_step_checkpoints_bound_the_loss_of_a_kill(tmp_path, fashion_dir):
    proc = start(fit_args(tmp_path, fashion_dir, *NOISY, "--checkpoint.every_n_train_steps=5"), tmp_path / "run.log")
    wait_for_checkpoint(proc, run_dir(tmp_path) / "checkpoints" / "last.ckpt", min_step=50)
    proc.kill()
    proc.wait()
    saved = last_ckpt(tmp_path)["global_step"]
    assert saved % 5 == 0 and saved % 40 != 0  # a mid-epoch checkpoint
    resumed = run(fit_args(tmp_path, fashion_dir, *NOISY, "--checkpoint.every_n_train_steps=5", "--ckpt_path=last"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert last_ckpt(tmp_path)["global_step"] == 160  # the interrupted epoch is completed, not repeated


def _save_forever(path: Path, i: int) -> None:
    io = AtomicCheckpointIO()
    while True:
        i += 1
        io.save_checkpoint({"state_dict": {"w": torch.tensor([float(i)])}, "blob": bytes([i % 256]) * 8_000_000}, path)


def test_kill_9_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    path, tmp = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.tmp"
    fork = multiprocessing.get_context("fork")  # a writer that starts in milliseconds, killed 50 times
    rng = random.Random(0)
    mid_write = 0
    for round_ in range(50):
        before = path.stat().st_ino if path.exists() else None
        proc = fork.Process(target=_save_forever, args=(path, round_ * 100_000))
        proc.start()
        while not path.exists() or path.stat().st_ino == before:  # this writer has renamed a file into place
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.kill()
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        mid_write += tmp.exists() and tmp.stat().st_size > 0
        ckpt = torch.load(path, weights_only=True)  # never torn: the old file or the new one
        i = int(ckpt["state_dict"]["w"].item())
        assert i > round_ * 100_000 and ckpt["blob"] == bytes([i % 256]) * 8_000_000
    assert mid_write >= 10  # many kills landed inside a write, and still the checkpoint loaded


def test_atomic_io_refuses_non_finite_weights(tmp_path):
    with pytest.raises(NonFiniteError, match="weight w is not finite"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_exploding_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, fashion_dir):
    # epoch 0 trains normally; StepLR then multiplies the learning rate by 1e6 and the loss diverges
    sgd, step = (f"--config={ROOT / 'configs' / c}" for c in ("optimizers/sgd_momentum.yaml", "schedulers/step.yaml"))
    explode = ["--model.scheduler.init_args.step_size=1", "--model.scheduler.init_args.gamma=1e6"]
    result = run(
        fit_args(
            tmp_path, fashion_dir, "--trainer.max_epochs=3", "--trainer.limit_train_batches=20", sgd, step, *explode
        )
    )
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert message.startswith("error: Training stopped at epoch 1, step ")
    assert "the training loss is nan" in message or "the training loss is inf" in message
    assert f"The last good checkpoint is {last}" in message
    for path in (run_dir(tmp_path) / "checkpoints").glob("*.ckpt"):
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["epoch"] == 0 and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_last_checkpoint_is_the_last_epoch_even_when_it_is_not_the_best(tmp_path, fashion_dir):
    # no BatchNorm and a zero learning rate: val/acc never changes, so only epoch 0 is ever "best"
    c = cli(fit_args(tmp_path, fashion_dir, "--trainer.max_epochs=3", "--model.net=project.models.SoftmaxRegression",
                     "--model.scheduler=null", "--model.optimizer.init_args.lr=0"))  # fmt: skip
    assert Path(c.trainer.checkpoint_callback.best_model_path).name == "best-epoch000.ckpt"
    assert last_ckpt(tmp_path)["epoch"] == 2 and last_ckpt(tmp_path)["global_step"] == 12


class NaNWhenEvaluatingAfter(nn.Module):
    """A net whose evaluation outputs turn NaN once it has trained ``steps`` batches: a finite-weights
    model whose monitored val/loss is NaN, as a diverging run's would be."""

    def __init__(self, in_shape, num_outputs, steps: int = 4):
        super().__init__()
        self.linear = nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_outputs)
        self.steps, self.trained = steps, 0

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        self.trained += self.training
        return logits * float("nan") if not self.training and self.trained > self.steps else logits


def test_nan_val_metric_is_never_kept_as_best_or_last(tmp_path, fashion_dir):
    with pytest.raises(NonFiniteError, match=r"Training stopped at epoch 1, step 8: val/loss is nan"):
        net = f"--model.net={__name__}.NaNWhenEvaluatingAfter"
        cli(fit_args(tmp_path, fashion_dir, "--trainer.max_epochs=3", net,
                     "--model.scheduler=null", "--checkpoint.monitor=val/loss", "--checkpoint.mode=min",
                     "--early_stopping.monitor=val/loss", "--early_stopping.mode=min"))  # fmt: skip
    checkpoints = sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").iterdir())
    assert checkpoints == ["best-epoch000.ckpt", "last.ckpt"]
    state = next(s for s in last_ckpt(tmp_path)["callbacks"].values() if "best_model_score" in s)
    assert torch.isfinite(state["best_model_score"]) and last_ckpt(tmp_path)["epoch"] == 0


@pytest.fixture
def fashion_copy(tmp_path, fashion_dir) -> Path:
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (fashion_dir / "FashionMNIST" / "raw").iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    return raw


def test_truncated_file_is_named_with_the_fix(fashion_copy):
    images = fashion_copy / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-784])  # one image short: torchvision alone fails late, in reshape
    with pytest.raises(DataError) as err:
        registry.prepare("fashion_mnist", fashion_copy.parents[1], download=False)
    assert f"file {images} is corrupt or truncated (47039232 bytes" in str(err.value)
    assert "Delete it and run again" in str(err.value) and "dataset-fashion-mnist" in str(err.value)


def test_same_length_corruption_is_caught(fashion_copy):
    labels = fashion_copy / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[500] = (data[500] + 1) % 10  # one wrong label, same size, still a valid class: only a checksum sees it
    labels.write_bytes(bytes(data))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is corrupt or truncated"):
        registry.prepare("fashion_mnist", fashion_copy.parents[1], download=False)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PAYLOAD_MARK"]),))


def test_checkpoints_load_without_arbitrary_pickle(tmp_path, fashion_dir, monkeypatch):
    cli(fit_args(tmp_path, fashion_dir))
    good = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)  # plain types only
    assert {"rng_states", "state_dict", "callbacks", "loops"} <= set(good)
    evil = tmp_path / "evil.ckpt"
    mark = tmp_path / "pwned"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    torch.save({**good, "extra": _Payload()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    result = run(["test", f"--data.data_dir={fashion_dir}",
                  f"--ckpt_path={evil}", "--trainer.limit_test_batches=1"])  # fmt: skip
    assert result.returncode == 2 and not mark.exists()
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {evil} holds objects other than tensors and plain types")
    assert "weights_only=False" in message
