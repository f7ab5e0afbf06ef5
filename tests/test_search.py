"""Optuna search on tiny budgets with the real Fashion-MNIST: pruning, best.yaml, kill -9 and resume, two workers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import OFFLINE, ROOT, TINY, run

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def search_args(tmp_path: Path, fashion_dir: Path, space: str, trials: int, *options: str) -> list[str]:
    (tmp_path / "space.yaml").write_text(space)
    return ["search", f"--space={tmp_path / 'space.yaml'}",
            f"--trials={trials}", f"--logs={tmp_path / 'search'}", "--heartbeat=1", *options,
            "--", *TINY, "--trainer.max_epochs=2", f"--data.data_dir={fashion_dir}"]  # fmt: skip


def study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="space", storage=f"sqlite:///{tmp_path / 'search' / 'space' / 'study.db'}")


def test_grid_search_prunes_the_bad_trial_and_writes_a_best_yaml_that_trains(tmp_path, fashion_dir):
    space = "model.scheduler.init_args.max_lr: {choices: [0.003, 0.002, 0.001, 1.0e-7]}\n"
    # seed 0 draws 1e-7 second, after the one trial the pruner needs to compare with
    args = search_args(tmp_path, fashion_dir, space, 4, "--sampler=grid", "--startup-trials=1", "--warmup-epochs=0")
    result = run(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = {t.params["model.scheduler.init_args.max_lr"]: t for t in study(tmp_path).trials}
    assert trials[1e-7].state == optuna.trial.TrialState.PRUNED and len(trials[1e-7].intermediate_values) == 1
    # trial 0 (never pruned) completes; the median pruner may also stop a good trial that trails it at epoch 0
    best = study(tmp_path).best_trial
    assert best.state == optuna.trial.TrialState.COMPLETE and best.params["model.scheduler.init_args.max_lr"] > 1e-7
    assert best.value == max(best.intermediate_values.values())  # the objective is the best val/acc of the run
    directory = tmp_path / "search" / "space"
    for name in ("trials.md", "trials.csv", "history.png", "best.yaml"):
        assert (directory / name).stat().st_size > 0, name
    assert (directory / f"trial_{best.number:03d}" / "version_0" / "checkpoints" / "last.ckpt").exists()
    assert "| PRUNED |" in (directory / "trials.md").read_text()

    # best.yaml is a whole config that fit takes as it is
    trained = run(["fit", f"--config={directory / 'best.yaml'}", *TINY, f"--data.data_dir={fashion_dir}",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'best'}"])  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert f"max_lr: {best.params['model.scheduler.init_args.max_lr']}" in (directory / "best.yaml").read_text()
    assert (tmp_path / "best" / "search_space_best" / "version_0" / "checkpoints" / "last.ckpt").exists()


def _trial_processes(name: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and name.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


SPACE = "model.scheduler.init_args.max_lr: {low: 1.0e-3, high: 1.0e-2, log: true}\n"


def test_kill_9_loses_only_the_running_trial_and_the_same_command_continues(tmp_path, fashion_dir):
    args = search_args(tmp_path, fashion_dir, SPACE, 3)
    env = {**os.environ, **OFFLINE}
    search = subprocess.Popen([sys.executable, "-m", "project", *args], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    db = tmp_path / "search" / "space" / "study.db"
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline and search.poll() is None
        try:
            states = [t.state for t in study(tmp_path).trials] if db.exists() else []
        except KeyError:  # the file exists before the study is written into it
            states = []
        if optuna.trial.TrialState.COMPLETE in states and states[-1] == optuna.trial.TrialState.RUNNING:
            break
        time.sleep(0.2)
    running = study(tmp_path).trials[-1].number
    search.kill()
    assert search.wait() == -signal.SIGKILL
    time.sleep(1)
    assert _trial_processes(f"trial_{running:03d}") == []  # the trial's training died with the search

    time.sleep(3)  # the grace period of a 1 s heartbeat, after which the trial counts as stale
    again = run(args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = study(tmp_path).trials
    assert trials[running].state == optuna.trial.TrialState.FAIL  # lost: only the trial that was running
    assert sum(t.state in FINISHED for t in trials) == 3
    retried = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == running]
    assert len(retried) == 1 and retried[0].params == trials[running].params


def test_two_workers_share_one_sqlite_study(tmp_path, fashion_dir):
    args = search_args(tmp_path, fashion_dir, SPACE, 4)
    env = {**os.environ, **OFFLINE}
    (tmp_path / "space.yaml").write_text(SPACE)
    first = subprocess.Popen([sys.executable, "-m", "project", *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    time.sleep(2)  # let the first create the study
    second = subprocess.Popen([sys.executable, "-m", "project", *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    outputs = [p.communicate(timeout=400)[0] for p in (first, second)]
    assert (first.returncode, second.returncode) == (0, 0), outputs[0][-2000:] + outputs[1][-2000:]
    trials = study(tmp_path).trials
    finished = [t for t in trials if t.state in FINISHED]
    assert 4 <= len(finished) <= 5  # a worker may finish the one it had started when the other reached 4
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    assert len({t.number for t in trials}) == len(trials)
    # three startup trials are never pruned, so there are enough complete ones to rank the parameters
    assert (tmp_path / "search" / "space" / "importances.png").stat().st_size > 0


def test_bad_space_is_refused(tmp_path, fashion_dir):
    result = run(search_args(tmp_path, fashion_dir, "model.optimizer.init_args.lr: {min: 0.1}\n", 1))
    assert result.returncode == 2
    assert "is not a search dimension" in result.stderr.strip().splitlines()[-1]
    with pytest.raises(AssertionError):
        assert "Traceback" in result.stderr
