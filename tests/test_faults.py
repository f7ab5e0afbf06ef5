"""Faults provoked for real: SIGINT, SIGTERM and kill -9 at every phase of a run, kills during checkpoint writes,
runs started side by side, exploding losses and NaN metrics."""

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import Child, fit_args, invoke
from torch import nn

from project.checkpoint import AtomicCheckpointIO
from project.errors import NonFiniteError

pytestmark = pytest.mark.slow

# shuffling, dropout and random crops/flips all draw from the RNGs that a resume must restore
NOISY = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=6",
    "--trainer.limit_val_batches=3",
    "--trainer.limit_test_batches=2",
    "--model.net.init_args.dropout=0.3",
    "--data.crop_padding=2",
    "--data.hflip=true",
]
STEPS = 12  # 2 epochs of 6 batches


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "fashion_mnist_cnn" / "version_0"


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def fault(tmp_path: Path, signal_name: str, phase: str, batch: int = 1) -> str:
    once = str(tmp_path / "fault_fired")
    spec = {"class_path": "helpers.Fault", "init_args": {"signal": signal_name, "phase": phase, "batch": batch,
                                                          "once": once}}  # fmt: skip
    return f"--trainer.callbacks+={json.dumps(spec)}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fashion_dir) -> dict:
    """The run every interrupted one is compared with: the same arguments, never stopped."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    child = Child(fit_args(tmp, fashion_dir, *NOISY), tmp / "run.log")
    assert child.wait() == 0, child.output[-3000:]
    return load(run_dir(tmp) / "checkpoints" / "last.ckpt")


# phase -> where the run's newest checkpoint is when a kill -9 lands there, and whether a signal stops it at an
# epoch boundary (after which the resumed run must equal the uninterrupted one bit for bit)
PHASES = {
    "sanity": True,  # the checkpoint written before the first step
    "train0": False,  # a signal stops after the batch in progress: mid-epoch
    "val0": True,  # a signal lets the validation finish: the end of epoch 0
    "train1": False,
    "val1": True,
    "test": True,  # the test after fit: training is complete
    "save": True,  # inside the write of epoch 0's checkpoint
}
SIGNALS = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -signal.SIGKILL}
# SIGINT and SIGTERM share one handler (signals.StopSignals): SIGTERM lands in every phase but train1 (a stop in the
# middle of an epoch, as in train0), Ctrl+C in the first epoch's training and validation and inside a save; kill -9 once
# for each checkpoint it can leave newest (in val0 it is still the sanity one, as in train0; in train1 epoch 0's, as
# in val1)
CASES = [
    *(("SIGTERM", p) for p in PHASES if p != "train1"),
    *(("SIGINT", p) for p in ("train0", "val0", "save")),
    *(("SIGKILL", p) for p in ("sanity", "train0", "val1", "test", "save")),
]


@pytest.mark.parametrize("signal_name, phase", CASES)
def test_a_fault_at_any_phase_leaves_a_run_that_resume_finishes(tmp_path, fashion_dir, uninterrupted, signal_name,
                                                                phase):  # fmt: skip
    child = Child(fit_args(tmp_path, fashion_dir, *NOISY, fault(tmp_path, signal_name, phase)), tmp_path / "run.log")
    assert child.wait() == SIGNALS[signal_name], child.output[-3000:]
    checkpoints = run_dir(tmp_path) / "checkpoints"
    interrupted = load(checkpoints / "last.ckpt")  # there is one, and it loads
    if signal_name != "SIGKILL":
        assert f"Stopped by {signal_name}" in child.output and "Traceback" not in child.output
        assert f"python -m project resume {run_dir(tmp_path)}" in child.output
    assert not list(checkpoints.glob(".*.tmp")) or phase == "save"  # only a kill mid-write leaves its temporary file

    resumed = Child(["resume", str(run_dir(tmp_path))], tmp_path / "resume.log")
    assert resumed.wait() == 0, resumed.output[-3000:]
    assert "test/acc" in resumed.output
    final = load(checkpoints / "last.ckpt")
    assert final["global_step"] == STEPS
    assert [p.name for p in checkpoints.glob("last*")] == ["last.ckpt"]  # rewritten, never a last-v1.ckpt beside it
    assert [p.name for p in run_dir(tmp_path).parent.iterdir()] == ["version_0"]  # the same run directory
    at_boundary = PHASES[phase] or signal_name == "SIGKILL"  # a kill leaves the last epoch-end checkpoint
    if at_boundary:
        assert interrupted["global_step"] % 6 == 0
        for name, tensor in uninterrupted["state_dict"].items():
            assert torch.equal(tensor, final["state_dict"][name]), name


@pytest.mark.parametrize("signal_name", SIGNALS)
def test_a_fault_in_predict_writes_nothing_and_changes_nothing(tmp_path, fashion_dir, signal_name):
    assert invoke(fit_args(tmp_path, fashion_dir)).returncode == 0
    before = {p: p.read_bytes() for p in run_dir(tmp_path).rglob("*") if p.is_file()}
    logs = f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"
    args = ["predict", "--ckpt_path=best", f"--data.data_dir={fashion_dir}", "--trainer.accelerator=cpu", logs,
            fault(tmp_path, signal_name, "predict")]  # fmt: skip
    child = Child(args, tmp_path / "predict.log")
    assert child.wait() == SIGNALS[signal_name], child.output[-3000:]
    if signal_name != "SIGKILL":
        assert f"Stopped by {signal_name} during predict; it wrote nothing" in child.output
    assert not list(run_dir(tmp_path).rglob("predictions.csv"))
    assert {p: p.read_bytes() for p in before} == before  # the training run as it was


def test_step_checkpoints_bound_the_loss_from_the_first_step(tmp_path, fashion_dir):
    # killed at step 5 of epoch 0, before any validation: the checkpoint of step 4 is there
    every_2 = "--checkpoint.every_n_train_steps=2"
    args = fit_args(tmp_path, fashion_dir, *NOISY, every_2, fault(tmp_path, "SIGKILL", "train0", 5))
    child = Child(args, tmp_path / "run.log")
    assert child.wait() == -signal.SIGKILL
    assert load(run_dir(tmp_path) / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = Child(["resume", str(run_dir(tmp_path))], tmp_path / "resume.log")
    assert resumed.wait() == 0, resumed.output[-3000:]
    assert load(run_dir(tmp_path) / "checkpoints" / "last.ckpt")["global_step"] == STEPS  # completed, not repeated


def test_runs_started_side_by_side_get_their_own_directories(tmp_path, fashion_dir):
    children = [Child(fit_args(tmp_path, fashion_dir), tmp_path / f"run{i}.log") for i in range(4)]
    assert [c.wait() for c in children] == [0] * 4, [c.output[-2000:] for c in children]
    runs = sorted(p.name for p in (tmp_path / "logs" / "fashion_mnist_cnn").iterdir())
    assert runs == [f"version_{i}" for i in range(4)]
    for run in runs:
        directory = tmp_path / "logs" / "fashion_mnist_cnn" / run
        assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
        assert len(list(directory.glob("events.out.tfevents.*"))) == 2  # fit, and its test: one process's
        assert (directory / "config.yaml").is_file()


def _save_forever(path: Path, i: int) -> None:
    io = AtomicCheckpointIO()
    while True:
        i += 1
        io.save_checkpoint({"state_dict": {"w": torch.tensor([float(i)])}, "blob": bytes([i % 256]) * 8_000_000}, path)


def _writing(tmp: Path) -> bool:
    for leftover in tmp.parent.glob(f"{tmp.name}.*.tmp"):  # .last.ckpt.<pid>.tmp
        try:
            if leftover.stat().st_size > 0:
                return True
        except FileNotFoundError:
            pass
    return False


def test_kill_9_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    path, tmp = tmp_path / "last.ckpt", tmp_path / ".last.ckpt"
    fork = multiprocessing.get_context("fork")  # a writer that starts in milliseconds, killed 30 times
    rng = random.Random(0)
    mid_write = 0
    for round_ in range(30):
        before = path.stat().st_ino if path.exists() else None
        proc = fork.Process(target=_save_forever, args=(path, round_ * 100_000))
        proc.start()
        while not path.exists() or path.stat().st_ino == before:  # this writer has renamed a file into place
            time.sleep(0.002)
        if round_ % 2:  # half the kills at a random moment, half once a write is under way (on a busy machine too)
            time.sleep(rng.uniform(0.0, 0.1))
        else:
            while not _writing(tmp):
                time.sleep(0.0005)
        proc.kill()
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        mid_write += _writing(tmp)
        ckpt = torch.load(path, weights_only=True)  # never torn: the old file or the new one
        i = int(ckpt["state_dict"]["w"].item())
        assert i > round_ * 100_000 and ckpt["blob"] == bytes([i % 256]) * 8_000_000
    assert mid_write >= 6  # many kills landed inside a write, and still the checkpoint loaded
    # each killed writer left its temporary file; the next write removes those of processes that are gone
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, path)
    assert not list(tmp_path.glob(".last.ckpt.*.tmp"))


def test_exploding_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, fashion_dir):
    # epoch 0 trains normally; StepLR then multiplies the learning rate by 1e6 and the loss diverges
    presets = [f"--config=configs/{c}.yaml" for c in ("optimizers/sgd_momentum", "schedulers/step")]
    explode = ["--model.scheduler.init_args.step_size=1", "--model.scheduler.init_args.gamma=1e6"]
    result = invoke(fit_args(tmp_path, fashion_dir, "--trainer.max_epochs=3", "--trainer.limit_train_batches=20",
                             *presets, *explode))  # fmt: skip
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert message.startswith("error: Training stopped at epoch 1, step ")
    assert "the training loss is nan" in message or "the training loss is inf" in message
    assert f"The last good checkpoint is {last}" in message
    for path in (run_dir(tmp_path) / "checkpoints").glob("*.ckpt"):
        ckpt = load(path)
        assert ckpt["epoch"] == 0 and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values()), path


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
    net = f"--model.net={__name__}.NaNWhenEvaluatingAfter"
    with pytest.raises(NonFiniteError, match=r"Training stopped at epoch 1, step 8: val/loss is nan"):
        from conftest import cli

        cli(fit_args(tmp_path, fashion_dir, "--trainer.max_epochs=3", net,
                     "--model.scheduler=null", "--checkpoint.monitor=val/loss", "--checkpoint.mode=min",
                     "--early_stopping.monitor=val/loss", "--early_stopping.mode=min"))  # fmt: skip
    checkpoints = sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").iterdir())
    assert checkpoints == ["best-epoch000.ckpt", "last.ckpt"]
    last = load(run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    state = next(s for s in last["callbacks"].values() if "best_model_score" in s)
    assert torch.isfinite(state["best_model_score"]) and last["epoch"] == 0


class Diverging(nn.Module):
    """Its weights turn NaN after ``steps`` optimizer steps (as a diverging run's do) while its loss stays finite."""

    def __init__(self, in_shape, num_outputs, steps: int = 3):
        super().__init__()
        self.linear = nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_outputs)
        self.steps, self.calls = steps, 0

    def forward(self, x):
        self.calls += self.training
        if self.calls > self.steps:
            with torch.no_grad():
                self.linear.weight[0, 0] = float("nan")
        return torch.nan_to_num(self.linear(x.flatten(1)))


def test_non_finite_weights_are_never_written_and_finite_ones_always_are(tmp_path, fashion_dir):
    # a stop in epoch 0 writes val/acc_best's initial -inf (a metric state, not a weight) without complaint
    child = Child(fit_args(tmp_path, fashion_dir, *NOISY, fault(tmp_path, "SIGTERM", "train0")), tmp_path / "run.log")
    assert child.wait() == 143, child.output[-3000:]
    assert load(run_dir(tmp_path) / "checkpoints" / "last.ckpt")["state_dict"]["val_acc_best.max_value"] == -torch.inf
    other = tmp_path / "other"
    result = invoke(fit_args(other, fashion_dir, f"--model.net={__name__}.Diverging", "--model.scheduler=null"))
    assert result.returncode == 1 and "weight net.linear.weight is not finite" in result.stderr
    for path in (run_dir(other) / "checkpoints").glob("*.ckpt"):
        assert all(torch.isfinite(t).all() for k, t in load(path)["state_dict"].items() if k.startswith("net."))


def test_worker_processes_take_ctrl_c_silently(tmp_path):
    # a terminal's Ctrl+C reaches DataLoader workers too: they inherit the handler, and only the run's process speaks
    from project.signals import StopSignals

    log = tmp_path / "worker.err"

    def worker() -> None:
        os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT), 2)
        os.kill(os.getpid(), signal.SIGINT)
        os._exit(0 if StopSignals.signum is None else 1)

    with StopSignals():
        process = multiprocessing.get_context("fork").Process(target=worker)
        process.start()
        process.join()
        assert process.exitcode == 0 and log.read_text() == ""
        os.kill(os.getpid(), signal.SIGINT)  # the run's own process notes it
        noted, StopSignals.signum = StopSignals.signum, None  # the next test in this process starts afresh
    assert noted == signal.SIGINT
