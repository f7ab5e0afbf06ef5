"""``python -m project search``: hyperparameter search with Optuna over any config key; every trial is a normal run.

    python -m project search --space configs/search/fashion_mnist.yaml --trials 20
    python -m project search ... --sampler grid                        # every combination of the space's choices
    python -m project search ... --storage postgresql://user@host/db   # many workers on many machines

The study lives in an Optuna RDB storage, ``logs/search/<study>/study.db`` (SQLite) unless ``--storage`` names
another. Rerunning the same command continues the study until it holds ``--trials`` finished trials: a search
killed with -9 loses only its running trial, which the next start marks failed and retries. Workers started on
the same storage share the study. Each trial trains as ``logs/search/<study>/trial_<n>/version_0`` and reports
its monitored metric after every epoch; Optuna's median pruner stops those that fall behind. At the end:
``best.yaml`` (train it with ``python -m project fit --config best.yaml``), ``trials.md``/``trials.csv``,
``history.png`` and ``importances.png``.

Arguments after ``--`` go to every trial's ``fit`` only (a smaller budget, for instance ``-- --trainer.max_epochs=3``),
and may not set a key the space searches; ``best.yaml`` keeps the base config's budget with the best trial's values.
A trial trains the chosen config files first, then the sampled keys, so a file never overrides a sampled value. Every
value of the space is parsed before the first trial (a misspelt key stops the search at once); a trial that cannot
start (exit 2), or three failing in a row, stop it with the reason.

The space is YAML, one entry per config key (or ``configs`` to choose between whole config files):

    model.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    data.batch_size: {choices: [128, 256, 512]}
    model.net.init_args.dropout: {low: 0.0, high: 0.5}
    optimizer: {configs: [configs/optimizers/adamw.yaml, configs/optimizers/sgd_nesterov.yaml]}
"""

import argparse
import csv
import ctypes
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from project.commands.experiments import placement, resolve, wait_for
from project.configs import DEFAULT_CONFIG
from project.errors import ConfigError, ProjectError

PRUNED_EXIT = 3
MAX_FAILURES = 3  # trials failing in a row before a search gives up


class Pruned(ProjectError):
    exit_code = PRUNED_EXIT


class OptunaReport(Callback):
    """In a trial's run: reports ``monitor`` to the Optuna trial after each validation, and stops the run when the
    study's median pruner finds it behind the other trials at that epoch."""

    def __init__(self, storage: str, study: str, trial_id: int, monitor: str, startup_trials: int, warmup_epochs: int):
        self.storage, self.study, self.trial_id, self.monitor = storage, study, trial_id, monitor
        self.pruner = optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        study = optuna.load_study(study_name=self.study, storage=storage(self.storage), pruner=self.pruner)
        self.trial = optuna.trial.Trial(study, self.trial_id)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = trainer.callback_metrics[self.monitor].item()
        self.trial.report(value, trainer.current_epoch)
        if self.trial.should_prune():
            raise Pruned(
                f"trial {self.trial.number} pruned at epoch {trainer.current_epoch}: {self.monitor}={value:.4f}"
            )


def storage(url: str, heartbeat: int = 10) -> optuna.storages.RDBStorage:
    """The study's storage: heartbeats let a restarted search fail (and retry) the trial a killed one left running."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # two workers on one SQLite file
    open_storage = functools.partial(
        optuna.storages.RDBStorage,
        url,
        engine_kwargs=kwargs,
        heartbeat_interval=heartbeat,
        grace_period=3 * heartbeat,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
    for _ in range(4):
        try:
            return open_storage()
        except (IntegrityError, OperationalError):  # workers started together both create the new storage's tables
            time.sleep(0.2 + random.random())
    return open_storage()


def load_space(path: Path) -> dict[str, dict]:
    """The search space, checked: every entry a dimension that Optuna can sample, every config file there."""
    if not path.is_file():
        raise ConfigError(f"--space {path}: no such file.")
    try:
        space = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--space {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"--space {path} holds no dimensions; give one per config key, e.g. "
                          "model.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}")  # fmt: skip
    for key, spec in space.items():
        kinds = set()
        if isinstance(spec, dict):
            kinds = {"configs", "choices"} & set(spec) or ({"range"} if {"low", "high"} <= set(spec) else set())
        if len(kinds) != 1 or set(spec) - {"configs", "choices", "low", "high", "log", "step"}:
            raise ConfigError(
                f"{path}: {key}: {spec} is not a search dimension; give {{low, high[, log, step]}}, {{choices: [...]}} "
                "or {configs: [files]}."
            )
        values = spec.get("configs", spec.get("choices"))
        if values is not None and (not isinstance(values, list) or not values):
            raise ConfigError(
                f"{path}: {key}: give a non-empty list of {'configs' if 'configs' in spec else 'choices'}."
            )
        if "low" in spec:
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) or low > high:
                raise ConfigError(f"{path}: {key}: low ({low}) and high ({high}) must be numbers with low <= high.")
            if spec.get("log") and low <= 0:
                raise ConfigError(f"{path}: {key}: a log scale needs low > 0 (got {low}).")
        for config in spec.get("configs", []):
            config_file(config, path)
    return space


def config_file(name: str, space: Path) -> Path:
    """A config file a space names, found beside the space file, in the project, or from the working directory."""
    for base in (space.parent, DEFAULT_CONFIG.parents[1], Path.cwd()):
        if (base / name).is_file():
            return base / name
    raise ConfigError(f"{space}: config file {name} is neither beside the space file, in the project, nor here.")


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> None:
    for key, spec in space.items():
        if "configs" in spec or "choices" in spec:
            trial.suggest_categorical(key, spec.get("configs", spec.get("choices")))
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False))
        else:
            trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False))


def config_args(params: dict, space: dict[str, dict], space_file: Path) -> list[str]:
    """A trial's parameters as ``fit`` arguments: the chosen config files first, then ``--KEY=VALUE`` for the rest, so
    that a file's values never override a sampled one."""
    files = [f"--config={config_file(v, space_file)}" for k, v in params.items() if "configs" in space[k]]
    # a string as it is: jsonargparse keeps the quotes of a JSON string given for a str inside a class's init_args
    return files + [f"--{k}={v if isinstance(v, str) else json.dumps(v)}"
                    for k, v in params.items() if "configs" not in space[k]]  # fmt: skip


def check_space(space: dict[str, dict], space_file: Path, base: list[str]) -> None:
    """Every value of every dimension parses as a config (the other dimensions at their first value): a misspelt key
    or a value of the wrong type stops the search before its first trial, not after trials that all fail."""
    first = {k: s.get("configs", s.get("choices", [s.get("low")]))[0] for k, s in space.items()}
    for key, spec in space.items():
        for value in spec.get("configs", spec.get("choices", [spec.get("low"), spec.get("high")])):
            resolve([*base, *config_args({**first, key: value}, space, space_file)], "a trial")


def _die_with_parent() -> None:
    # a trial must not outlive a search killed with -9 (Linux: PR_SET_PDEATHSIG = 1)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def best_value(trial: optuna.trial.FrozenTrial, maximize: bool) -> float | None:
    values = trial.intermediate_values.values()
    return (max if maximize else min)(values) if values else None


def choices(study: optuna.Study, space: dict) -> list[str]:
    """Each choice of each categorical dimension with the complete trials' best and mean value: the importances rank a
    choice that decides the result low when its trials are few or the other dimensions vary a lot among them."""
    maximize = study.direction.name == "MAXIMIZE"
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    lines = []
    for key, spec in space.items():
        for choice in spec.get("configs", spec.get("choices", [])) if "low" not in spec else []:
            values = [t.value for t in done if t.params.get(key) == choice]
            if values:
                best = max(values) if maximize else min(values)
                lines.append(f"- {key} = {choice}: {len(values)} complete trials, best {best:.4f}, mean "
                             f"{sum(values) / len(values):.4f}")  # fmt: skip
    return lines


def write_reports(study: optuna.Study, space: dict, space_file: Path, base: list[str], directory: Path, monitor: str):
    keys = list(space)
    columns = ["trial", "state", monitor, "epochs", "seconds", "worker", *keys]
    rows = []
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        value = t.value if t.value is not None else best_value(t, study.direction.name == "MAXIMIZE")
        rows.append(
            {"trial": t.number, "state": t.state.name, monitor: None if value is None else round(value, 4),
             "epochs": len(t.intermediate_values), "seconds": None if seconds is None else round(seconds, 1),
             "worker": t.user_attrs.get("worker"), **{k: t.params.get(k) for k in keys}}
        )  # fmt: skip
    with open(directory / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |" for r in rows]
    categorical = choices(study, space)
    if categorical:
        table += ["", "Categorical choices (what importances.png cannot show of them):", *categorical]
    (directory / "trials.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))

    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    plots.plot_optimization_history(study).figure.savefig(directory / "history.png", dpi=90, bbox_inches="tight")
    try:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        with warnings.catch_warnings(record=True) as said:  # Optuna's warning, with its source line, as one note
            warnings.simplefilter("always", UserWarning)
            ax = plots.plot_param_importances(study, evaluator=evaluator)
        for warning in said:
            print(f"note: importances.png: {warning.message}")
        if categorical:  # beside the bars, which can rank a choice that decides the result last
            caption = ["Categorical choices (what these bars cannot show of them):", *categorical]
            ax.figure.text(0.01, -0.02, "\n".join(caption), va="top", fontsize=8)
        ax.figure.savefig(directory / "importances.png", dpi=90, bbox_inches="tight")
    except (RuntimeError, ValueError) as err:  # too few finished trials, or a space of one point
        print(f"No parameter importances yet: {err}")

    best = study.best_trial
    name = f"--trainer.logger.init_args.name=search_{study.study_name}_best"
    resolved = resolve([*base, *config_args(best.params, space, space_file), name], "the best trial")
    (directory / "best.yaml").write_text(
        f"# best of study {study.study_name}: trial {best.number}, {monitor}={best.value:.4f}\n{resolved}"
    )
    print(f"\nBest: trial {best.number}, {monitor}={best.value:.4f} -> {directory / 'best.yaml'}")


def main(argv: list[str]) -> None:
    """``argv``: ``search`` and its arguments."""
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="python -m project search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="config files stacked on configs/default.yaml")
    parser.add_argument("--space", type=Path, required=True, help="the search space (YAML)")
    parser.add_argument("--trials", type=int, default=20, help="finished (complete or pruned) trials the study needs")
    parser.add_argument("--study", help="the study's name (default: the space file's name)")
    parser.add_argument("--storage", help="an SQLAlchemy URL (default: sqlite:///logs/search/<study>/study.db)")
    parser.add_argument("--sampler", choices=["tpe", "grid"], default="tpe")
    parser.add_argument("--monitor", default="val/acc")
    parser.add_argument("--direction", choices=["maximize", "minimize"], default="maximize")
    parser.add_argument("--startup-trials", type=int, default=3, help="trials that run unpruned before pruning starts")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="epochs of each trial that are never pruned")
    parser.add_argument("--heartbeat", type=int, default=10, help="seconds between a running trial's heartbeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", type=Path, default=Path("logs/search"))
    args = parser.parse_args(argv[1 : argv.index("--")] if "--" in argv else argv[1:])
    if args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: a study needs at least 1 trial.")
    run_search(args, extra)


def run_search(args: argparse.Namespace, extra: list[str]) -> None:
    # heartbeats (how a restarted search retries the trial a killed one left running) are still "experimental" in
    # Optuna 5; and Optuna logs each trial that fails with its traceback, which this command says in one line itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = load_space(args.space)
    # arguments after -- come after a trial's sampled ones, so they would win: a searched key there is never searched
    given = {a[2:].split("=", 1)[0] for a in extra if a.startswith("--")}
    if clash := sorted(k for k in space if any(g == k or f"{g}.".startswith(f"{k}.") for g in given)):
        raise ConfigError(f"the arguments after -- set {', '.join(clash)}, which the space searches: the trials would "
                          "all train the value given there. Remove it from one of the two.")  # fmt: skip
    base = [f"--config={c}" for c in args.config]
    check_space(space, args.space, base)
    # where a trial's run goes depends on the logger the trials have (one of the arguments after -- may change it)
    trials = yaml.safe_load(resolve([*base, *extra], "a trial"))
    name = args.study or args.space.stem
    directory = args.logs / name
    directory.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{directory / 'study.db'}"
    if args.sampler == "grid":
        if missing := [k for k, s in space.items() if "low" in s]:
            raise ConfigError(f"--sampler grid needs choices for every key; {', '.join(missing)} has a range.")
        grid = {k: s.get("configs", s.get("choices")) for k, s in space.items()}
        sampler = optuna.samplers.GridSampler(grid, seed=args.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=args.seed)
    study = optuna.create_study(study_name=name, storage=storage(url, args.heartbeat), sampler=sampler,
                                direction=args.direction, load_if_exists=True)  # fmt: skip
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    maximize = args.direction == "maximize"
    worker = f"{socket.gethostname()}:{os.getpid()}"
    failures = []  # this worker's trials that failed in a row

    def objective(trial: optuna.Trial) -> float:
        suggest(trial, space)
        trial.set_user_attr("worker", worker)
        run_name = f"trial_{trial.number:03d}"
        # the trial's id lets the run's callback report to this very trial from its own process: Optuna 5 keeps it
        # private (optuna issues 2987, 6365 ask for a way to reach a trial from another process)
        report = {"class_path": "project.commands.search.OptunaReport", "init_args": {
            "storage": url, "study": name, "trial_id": trial._trial_id, "monitor": args.monitor,
            "startup_trials": args.startup_trials, "warmup_epochs": args.warmup_epochs}}  # fmt: skip
        command = [sys.executable, "-m", "project", "fit", *base, *config_args(trial.params, space, args.space),
                   f"--trainer.callbacks+={json.dumps(report)}", *extra,
                   *placement(trials, directory, run_name)]  # fmt: skip
        shown = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        print(f"trial {trial.number} ({shown}): training", flush=True)
        start = time.monotonic()
        with open(directory / f"{run_name}.log", "w") as log:
            code = wait_for(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            )
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        value = best_value(frozen, maximize)
        took = f"{time.monotonic() - start:.0f} s"
        if code == PRUNED_EXIT:
            print(f"trial {trial.number}: pruned after {len(frozen.intermediate_values)} epochs ({took})", flush=True)
            raise optuna.TrialPruned()
        if code != 0 or value is None:
            failures.append(trial.number)
            log = directory / f"{run_name}.log"
            errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
            why = f"trial {trial.number} failed (exit {code}{': ' + errors[-1] if errors else ''}); see {log}"
            if code == 2 or len(failures) >= MAX_FAILURES:  # a config error fails every trial alike
                raise ProjectError(f"search stopped: {why}" + (f" (trials {failures} failed in a row)" if
                                   len(failures) > 1 else ""))  # fmt: skip
            print(why, flush=True)
            raise RuntimeError(why)
        failures.clear()
        print(f"trial {trial.number}: {args.monitor}={value:.4f} ({took})", flush=True)
        return value

    def enough(study: optuna.Study, _) -> None:
        if len(study.get_trials(deepcopy=False, states=finished)) >= args.trials:
            study.stop()

    if len(study.get_trials(deepcopy=False, states=finished)) < args.trials:
        study.optimize(objective, callbacks=[enough], catch=(RuntimeError,))
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise ProjectError(f"study {name} has no complete trial; see the logs in {directory}")
    write_reports(study, space, args.space, base, directory, args.monitor)
