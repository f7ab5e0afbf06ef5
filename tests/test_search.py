"""Optuna search on tiny budgets with the real Fashion-MNIST: what it samples is what trains, pruning, best.yaml,
kill -9 and resume, two workers, and one message for every bad space."""

import contextlib
import signal
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, TINY, Child, invoke

from project.commands.experiments import resolve
from project.commands.search import config_args, load_space

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# enough training per epoch that a learning rate of 1e-7 trails the others at once
BUDGET = [*TINY, "--trainer.max_epochs=2", "--trainer.limit_train_batches=8", "--data.batch_size=64"]


def search_args(tmp_path: Path, fashion_dir: Path, space: str, trials: int, *options: str) -> list[str]:
    (tmp_path / "space.yaml").write_text(space)
    return ["search", f"--space={tmp_path / 'space.yaml'}", f"--trials={trials}", f"--logs={tmp_path / 'search'}",
            "--heartbeat=1", *options, "--", *BUDGET, f"--data.data_dir={fashion_dir}"]  # fmt: skip


def study(tmp_path: Path) -> optuna.Study:
    """The study, read only: creating its tables here would race the search that creates them."""
    url = f"sqlite:///{tmp_path / 'search' / 'space' / 'study.db'}"
    return optuna.load_study(study_name="space", storage=optuna.storages.RDBStorage(url, skip_table_creation=True))


GRID = """\
model.optimizer.init_args.lr: {choices: [0.01, 1.0e-7]}
model.optimizer.init_args.weight_decay: {choices: [0.0123]}
optimizer: {configs: [configs/optimizers/adamw.yaml, configs/optimizers/sgd_nesterov.yaml]}
"""


@pytest.mark.slow
def test_grid_search_trains_what_it_samples_prunes_and_writes_a_best_yaml(tmp_path, fashion_dir):
    # seed 5 orders the grid with both 0.01 trials first: a 1e-7 one comes when there are epochs to compare with
    options = ("--sampler=grid", "--seed=5", "--startup-trials=1", "--warmup-epochs=0")
    args = search_args(tmp_path, fashion_dir, GRID, 3, *options)
    child = Child(args, tmp_path / "search.log")
    assert child.wait() == 0, child.output[-3000:]
    directory = tmp_path / "search" / "space"
    trials = study(tmp_path).trials
    for trial in trials:  # each trial's saved config holds exactly its parameters, the files' values overridden
        saved = directory / f"trial_{trial.number:03d}" / "version_0" / "config.yaml"
        model = yaml.safe_load(saved.read_text())["model"]["init_args"]
        optimizer = yaml.safe_load((ROOT / trial.params["optimizer"]).read_text())["model"]["optimizer"]
        assert model["optimizer"]["class_path"] == optimizer["class_path"]
        assert model["optimizer"]["init_args"]["weight_decay"] == 0.0123  # not the file's 0.05 or 0.0005
        assert model["optimizer"]["init_args"]["lr"] == trial.params["model.optimizer.init_args.lr"]
    # after the first trial (never pruned), a learning rate of 1e-7 is pruned at its first report
    assert len(trials) == 3 and len({t.params["optimizer"] for t in trials}) == 2
    slow = [t for t in trials if t.params["model.optimizer.init_args.lr"] == 1e-7]
    assert len(slow) == 1
    assert all(t.state == optuna.trial.TrialState.PRUNED and len(t.intermediate_values) == 1 for t in slow)
    best = study(tmp_path).best_trial
    assert best.state == optuna.trial.TrialState.COMPLETE and best.params["model.optimizer.init_args.lr"] == 0.01
    assert best.value == max(best.intermediate_values.values())  # the objective is the best val/acc of the run
    for name in ("trials.md", "trials.csv", "history.png", "best.yaml"):
        assert (directory / name).stat().st_size > 0, name
    assert "| PRUNED |" in (directory / "trials.md").read_text()
    # beside the importances, which can rank last a choice that decides the result: each choice's complete trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    listed = (directory / "trials.md").read_text().splitlines()
    for name in ("configs/optimizers/adamw.yaml", "configs/optimizers/sgd_nesterov.yaml"):
        values = [t.value for t in complete if t.params["optimizer"] == name]
        line = f"- optimizer = {name}: {len(values)} complete trials"
        if values:
            assert f"{line}, best {max(values):.4f}, mean {sum(values) / len(values):.4f}" in listed
        else:  # a choice whose trials were all pruned has no best to show
            assert not any(row.startswith(f"- optimizer = {name}:") for row in listed)
    assert not any(row.startswith("- model.optimizer.init_args.lr = 1e-07") for row in listed)  # pruned, always

    # best.yaml is a whole config, with the best trial's values, that fit takes as it is
    config = yaml.safe_load((directory / "best.yaml").read_text())
    assert config["model"]["init_args"]["optimizer"]["init_args"]["weight_decay"] == 0.0123
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.01
    trained = invoke(["fit", f"--config={directory / 'best.yaml'}", *TINY, f"--data.data_dir={fashion_dir}",
                      f"--trainer.logger.init_args.save_dir={tmp_path / 'best'}"])  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
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


def _has_heartbeat(db: Path, trial_id: int) -> bool:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as connection:
        query = "SELECT 1 FROM trial_heartbeats WHERE trial_id = ?"
        return connection.execute(query, (trial_id,)).fetchone() is not None


SPACE = "model.optimizer.init_args.lr: {low: 1.0e-3, high: 1.0e-2, log: true}\n"


@pytest.mark.slow
def test_kill_9_loses_only_the_running_trial_and_the_same_command_continues(tmp_path, fashion_dir):
    args = search_args(tmp_path, fashion_dir, SPACE, 2)
    search = Child(args, tmp_path / "search.log")
    db = tmp_path / "search" / "space" / "study.db"
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline and search.poll() is None, search.output[-3000:]
        try:
            states = [t.state for t in study(tmp_path).trials] if db.exists() else []
        except Exception:  # the file exists before the study is written into it, or is being created
            states = []
        if optuna.trial.TrialState.COMPLETE in states and states[-1] == optuna.trial.TrialState.RUNNING:
            last = study(tmp_path).trials[-1]
            # a kill before the trial's first heartbeat leaves it RUNNING for good (Optuna never calls it stale):
            # wait until it trains, as a user's kill would find it
            if _trial_processes(f"trial_{last.number:03d}") and _has_heartbeat(db, last._trial_id):
                break
        time.sleep(0.2)
    running = last.number
    search.kill()
    assert search.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 60  # the trial gets SIGTERM when its search dies, saves and exits
    while _trial_processes(f"trial_{running:03d}"):
        assert time.monotonic() < deadline, "the trial's training outlived its search"
        time.sleep(0.2)

    # the grace period of a 1 s heartbeat, after which the trial counts as stale, measured in whole seconds (SQLite's
    # CURRENT_TIMESTAMP): more than 3 s by its clock
    time.sleep(4.5)
    again = Child(args, tmp_path / "again.log")
    assert again.wait() == 0, again.output[-3000:]
    trials = study(tmp_path).trials
    assert trials[running].state == optuna.trial.TrialState.FAIL  # lost: only the trial that was running
    assert sum(t.state in FINISHED for t in trials) == 2
    retried = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == running]
    assert len(retried) == 1 and retried[0].params == trials[running].params


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path, fashion_dir):
    # and trials without a logger: a run that keeps its directory in trainer.default_root_dir goes into the study's
    args = [*search_args(tmp_path, fashion_dir, SPACE, 2), "--trainer.logger=false"]
    # started together: both create the new study's storage at the same moment
    first, second = Child(args, tmp_path / "first.log"), Child(args, tmp_path / "second.log")
    assert (first.wait(400), second.wait(400)) == (0, 0), first.output[-2000:] + second.output[-2000:]
    trials = study(tmp_path).trials
    finished = [t for t in trials if t.state in FINISHED]
    assert 2 <= len(finished) <= 3  # a worker may finish the one it had started when the other reached 2
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    assert len({t.number for t in trials}) == len(trials)
    for trial in finished:
        run = tmp_path / "search" / "space" / f"trial_{trial.number:03d}" / "version_0"
        assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("*.ckpt")), run
    # startup trials are never pruned, so there are complete ones enough to rank the parameters
    assert (tmp_path / "search" / "space" / "importances.png").stat().st_size > 0


@pytest.mark.parametrize(
    "space, expected",
    [
        ("model.optimizer.init_args.lr: {min: 0.1}\n", "is not a search dimension"),
        ("model.optimizer.init_args.lr: {low: 0.1, high: 0.01}\n", "must be numbers with low <= high"),
        ("model.optimizer.init_args.lr: {low: 0.0, high: 0.1, log: true}\n", "a log scale needs low > 0"),
        ("model.optimizer.init_args.lr: 0.1\n", "is not a search dimension"),
        ("[1, 2]\n", "holds no dimensions"),
        ("", "holds no dimensions"),
        ("a: [\n", "is not valid YAML"),
        ("data.batch_size: {choices: []}\n", "give a non-empty list of choices"),
        ("optimizer: {configs: [configs/optimizers/nope.yaml]}\n", "config file configs/optimizers/nope.yaml is"),
        # a misspelt key or a value of the wrong type stops before the first trial, not after trials that all fail
        ("model.optimizer.init_args.wieght_decay: {choices: [0.1]}\n", "Option 'wieght_decay' is not accepted"),
        ("data.crop_padding: {choices: [0, wide]}\n", "a trial would not start"),
    ],
    ids=["unknown-kind", "low-above-high", "log-of-zero", "scalar", "list", "empty", "malformed", "no-choices",
         "missing-config", "misspelt-key", "wrong-type"],
)  # fmt: skip
def test_a_bad_space_is_refused_with_one_message(tmp_path, fashion_dir, space, expected):
    result = invoke(search_args(tmp_path, fashion_dir, space, 1))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line
    assert not (tmp_path / "search" / "space" / "study.db").exists()  # refused before the study was created


@pytest.mark.parametrize("trials", ["0", "-3"])
def test_a_search_needs_trials(trials):
    result = invoke(["search", f"--space={ROOT / 'configs/search/fashion_mnist.yaml'}", f"--trials={trials}"])
    assert result.returncode == 2 and f"--trials {trials}: a study needs at least 1 trial" in result.stderr


@pytest.mark.slow
def test_a_trial_that_cannot_start_stops_the_search(tmp_path, fashion_dir):
    # parses (so the space check passes) but leaves no training batch: the first trial exits 2, the search stops
    child = Child(search_args(tmp_path, fashion_dir, "data.val_size: {choices: [59999]}\n", 5), tmp_path / "s.log")
    assert child.wait() == 1, child.output[-3000:]
    assert "search stopped: trial 0 failed (exit 2: error: data.batch_size=64 is more than the 1 " in child.output
    assert len(study(tmp_path).trials) == 1


def test_arguments_after_the_double_dash_cannot_set_a_searched_key(tmp_path, fashion_dir):
    result = invoke(search_args(tmp_path, fashion_dir, "data.batch_size: {choices: [32, 128]}\n", 2))
    assert result.returncode == 2 and "the arguments after -- set data.batch_size, which the space searches" in (
        result.stderr)  # fmt: skip


def test_config_files_in_a_space_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's search command, run from elsewhere
    space_file = ROOT / "configs" / "search" / "fashion_mnist.yaml"
    space = load_space(space_file)
    params = {key: (spec.get("configs") or spec.get("choices") or [spec["low"]])[0] for key, spec in space.items()}
    args = config_args(params, space, space_file)
    files = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    assert files and all(Path(f).is_file() for f in files)
    # the chosen files first: a file's values never override a sampled key
    assert args.index(f"--config={files[0]}") < min(i for i, a in enumerate(args) if not a.startswith("--config="))


def test_a_sampled_string_reaches_the_trial_as_that_string(tmp_path):
    # a str argument inside a class's init_args (a backbone's name): without its JSON quotes
    space_file = tmp_path / "space.yaml"
    space_file.write_text("model.net.init_args.name: {choices: [resnet10t, resnet14t]}\n")
    space = load_space(space_file)
    args = config_args({"model.net.init_args.name": "resnet14t"}, space, space_file)
    resolved = yaml.safe_load(resolve(["--model.net=project.models.Backbone", *args], "trial 0"))
    assert resolved["model"]["init_args"]["net"]["init_args"]["name"] == "resnet14t"
