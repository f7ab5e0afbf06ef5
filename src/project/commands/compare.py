"""``python -m project compare``: train configs side by side and compare them as a table and pictures.

    python -m project compare configs/experiments/regularization            # each variant over base.yaml
    python -m project compare configs/a.yaml configs/b.yaml --name mine     # whole configs
    python -m project compare configs/experiments/optimizers -- --trainer.max_epochs=5   # args for every run
    python -m project compare configs/experiments/optimizers --seeds 3      # each variant 3 times: mean +- std

Each variant trains as ``logs/experiments/<name>/<variant>/version_<n>`` (``<variant>/seed_<s>/version_<n>`` with
``--seeds``; a finished run there is reused if its config is the one that would train now, unless ``--rerun``); then
``comparison.md``, ``comparison.csv`` and ``curves.png`` are written beside them, read from each run's ``record.csv``
and ``run.json``, whatever its logger. Point TensorBoard at ``logs/experiments/<name>`` to compare the runs there.

With ``--seeds N`` (N >= 2), every variant trains with ``seed_everything`` 0..N-1 (the weights, the data order, dropout
and augmentation change; the train/val split, seeded by ``data.split_seed``, does not), and the table gives per variant
the mean +- standard deviation and the 95% confidence interval of the mean (Student's t, N-1 degrees of freedom) of
each metric, the epochs and seconds to a target validation accuracy, and Welch's t-test of its test accuracy against
the variant with the best mean: the runs of two variants are independent samples whose spread may differ (a big net's
more than a small one's), which is what Welch's test assumes and Student's equal-variance test does not; with 3 seeds it
can only detect differences several times the seed noise. The curves show each variant's mean with a band of +- one
standard deviation.

With ``--folds K`` (K >= 2; also with ``--seeds``), every variant trains K times, on the folds of its data module
(``data.folds``, ``data.fold``: the same folds for every variant, cut from the train and validation images; the test
images stay out of them), as ``<variant>/[seed_<s>/]fold_<k>``; the table gives the mean +- sd over the runs, and the
p-value of a paired t-test of the test accuracy against the best variant's, run against run of the same fold and
seed: the fold's images are the same for both, so the differences within a fold carry the comparison.
"""

import argparse
import copy
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from project.commands.experiments import placement, resolve, variants, wait_for
from project.errors import ConfigError
from project.runs import newest_first

COLUMNS = ["run", "status", "best val acc", "best epoch", "test acc", "train-val gap", "epochs", "wall s", "params"]
CURVES = {"train loss": "train/loss_epoch", "val loss": "val/loss", "train acc": "train/acc", "val acc": "val/acc"}


def metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's ``record.csv`` (:mod:`project.record`), the values as floats: what every run records,
    whatever its logger."""
    try:
        with open(run_dir / "record.csv") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    return [{k: (v if k == "stage" else float(v)) for k, v in row.items() if v not in ("", None)} for row in rows]


def finished(root: Path, config: dict | None = None) -> Path | None:
    """The newest run under ``root`` that got as far as its test, and (given ``config``, the resolved config of what
    would be trained now) trained that very config."""
    for run in newest_first(root):
        if any(row["stage"] == "test" for row in metrics(run)):
            return run if config is None or same_config(run, config) else None
    return None


def same_config(run: Path, config: dict) -> bool:
    """Whether a run's saved config is ``config``, but for where the run was placed (its logger's directory, version
    and the trainer's default_root_dir, which the run's own location sets)."""
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return _unplaced(saved) == _unplaced(config)


def _unplaced(config: dict) -> dict:
    config = copy.deepcopy(config)
    trainer = config.get("trainer") or {}
    trainer.pop("default_root_dir", None)
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict):
            for key in ("save_dir", "name", "version", "sub_dir"):
                (logger.get("init_args") or {}).pop(key, None)
    config.pop("ckpt_path", None)
    return config


def summarize(name: str, run_dir: Path) -> dict:
    rows = metrics(run_dir)
    fit = [r for r in rows if r["stage"] == "fit" and "val/acc" in r]
    test = [r for r in rows if r["stage"] == "test"][-1]
    val = [r["val/acc"] for r in fit]
    best = max(range(len(val)), key=val.__getitem__)
    ran_on = environment(run_dir)
    return {
        "run": name,
        "status": "ok",
        "best val acc": round(val[best], 4),
        "best epoch": int(fit[best]["epoch"]),
        "test acc": round(test["test/acc"], 4),
        "train-val gap": round(fit[-1].get("train/acc", math.nan) - val[-1], 4),
        "epochs": len(fit),
        "wall s": round(test["seconds"], 1),
        "params": ran_on.get("parameters"),
        "curves": {label: [r.get(tag, math.nan) for r in fit] for label, tag in CURVES.items()},
        "val acc at": [(r["seconds"], r["val/acc"]) for r in fit],  # (seconds since the run began, val acc)
        "environment": ran_on,
    }


def environment(run_dir: Path) -> dict:
    """What the run's latest session ran on (``run.json``)."""
    try:
        return json.loads((run_dir / "run.json").read_text())["sessions"][-1]
    except (OSError, ValueError, KeyError, IndexError):
        return {}


def to_target(row: dict, target: float) -> tuple[float, float]:
    """Epochs and seconds until the run's val acc first reached ``target`` (NaN if it never did)."""
    return next(((epoch + 1, t) for epoch, (t, v) in enumerate(row["val acc at"]) if v >= target), (math.nan, math.nan))


# Student's t from mpmath (torch's own dependency), not scipy: torchmetrics imports scipy.signal whenever scipy is
# installed, 0.7 s more at the launch of every command here


def t_tail(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (a regularised incomplete beta function)."""
    import mpmath

    return float(mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True))


def t_quantile(df: float, tail: float = 0.05) -> float:
    """The t with ``P(|T| >= t) = tail``: 4.303 for 2 degrees of freedom and 0.05."""
    import mpmath

    return float(mpmath.findroot(lambda t: t_tail(t, df) - tail, (0.0, 1e4), solver="bisect"))


def spread(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard deviation (N-1) and the half-width of the mean's 95% confidence interval (Student's t)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    if len(values) < 2:
        return values[0], math.nan, math.nan
    sd = statistics.stdev(values)
    return statistics.fmean(values), sd, t_quantile(len(values) - 1) * sd / math.sqrt(len(values))


def welch(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test that ``a`` and ``b`` have the same mean."""
    if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    return t_tail((statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb), df)


def paired_t(a: dict, b: dict) -> float:
    """Two-sided p-value of the paired t-test that the runs of ``a`` and ``b`` (test accuracies by fold and seed) have
    the same mean: the folds are the same images for both, so their differences carry the comparison."""
    differences = [a[key] - b[key] for key in a.keys() & b.keys()]
    if len(differences) < 2 or statistics.stdev(differences) == 0:
        return math.nan
    t = statistics.fmean(differences) / (statistics.stdev(differences) / math.sqrt(len(differences)))
    return t_tail(t, len(differences) - 1)


def train(name: str, args: list[str], save_dir: Path) -> str | None:
    """Runs one variant's fit, its progress bar on this terminal; returns the last error line if it failed."""
    log = save_dir / f"{name}.stderr.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        code = wait_for(subprocess.Popen([sys.executable, "-m", "project", "fit", *args], stderr=err))
    if code == 0:
        return None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return f"exit {code}: {lines[-1] if lines else 'no output'} (see {log})"


def plot(rows: list[dict], out: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5))
    axes = fig.subplots(2, 2).flatten()
    for ax, label in zip(axes, CURVES, strict=True):
        for row in rows:
            runs = row["seed curves"] if "seed curves" in row else [row["curves"]]
            length = min(len(r[label]) for r in runs)  # early stopping may end some seeds sooner
            columns = [[r[label][i] for r in runs] for i in range(length)]
            mean = [statistics.fmean(c) for c in columns]
            (line,) = ax.plot(range(length), mean, marker=".", label=row["run"])
            if len(runs) > 1:
                sd = [statistics.stdev(c) for c in columns]
                low = [m - s for m, s in zip(mean, sd, strict=True)]
                high = [m + s for m, s in zip(mean, sd, strict=True)]
                ax.fill_between(range(length), low, high, color=line.get_color(), alpha=0.2)
        ax.set(title=label, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


SEED_COLUMNS = ["run", "status", "seeds ok", "test acc", "test acc 95% CI", "p vs best (Welch)", "best val acc",
                "train-val gap", "epochs to target", "s to target", "wall s", "params"]  # fmt: skip


def aggregate(variant: str, runs: list[dict], target: float) -> dict:
    """One row for a variant's seeds: each metric as mean +- sd, the test accuracy's 95% CI, time to ``target``."""
    row = {"run": variant, "status": "ok", "seeds ok": len(runs), "params": runs[0]["params"],
           "test accs": [r["test acc"] for r in runs], "seed curves": [r["curves"] for r in runs],
           "by pair": {r["pair"]: r["test acc"] for r in runs}}  # fmt: skip
    reached = [to_target(r, target) for r in runs]
    metrics = {"test acc": [r["test acc"] for r in runs], "best val acc": [r["best val acc"] for r in runs],
               "train-val gap": [r["train-val gap"] for r in runs], "wall s": [r["wall s"] for r in runs],
               "epochs to target": [e for e, _ in reached], "s to target": [s for _, s in reached]}  # fmt: skip
    for key, values in metrics.items():
        mean, sd, half = spread(values)
        digits = 1 if key in ("wall s", "s to target", "epochs to target") else 4
        row[key] = f"{mean:.{digits}f} +- {sd:.{digits}f}" if not math.isnan(sd) else f"{mean:.{digits}f}"
        if key == "test acc" and not math.isnan(half):
            row["test acc 95% CI"] = f"[{mean - half:.4f}, {mean + half:.4f}]"
        if key.endswith("to target") and any(math.isnan(v) for v in values):
            row[key] += f" ({sum(not math.isnan(v) for v in values)}/{len(values)} reached)"
    return row


def write_tables(rows: list[dict], directory: Path, columns: list[str] = COLUMNS, caption: str = "") -> str:
    with open(directory / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    table = caption + "\n".join(lines) + "\n"
    (directory / "comparison.md").write_text(table)
    return table


def main(argv: list[str]) -> None:
    """``argv``: ``compare`` and its arguments."""
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="python -m project compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="an experiment directory, or config files")
    parser.add_argument("--name", help="the experiment's name (default: the directory's, or 'compare')")
    parser.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    parser.add_argument("--logs", type=Path, default=Path("logs/experiments"), help="where runs and results go")
    parser.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds 0..N-1 (default 1: the config's)")
    parser.add_argument("--folds", type=int, default=1, help="k-fold cross-validation: each variant on K folds")
    parser.add_argument("--target", type=float, help="val acc to time (default: the lowest best val acc of all runs)")
    args = parser.parse_args(argv[1 : argv.index("--")] if "--" in argv else argv[1:])
    if args.seeds < 1:
        raise ConfigError(f"compare --seeds {args.seeds}: give 1 or more runs per variant.")
    if args.folds < 1:
        raise ConfigError(f"compare --folds {args.folds}: give 2 or more folds (1: no cross-validation).")

    if len(args.configs) == 1 and args.configs[0].is_dir():
        variants_, name = variants(args.configs[0]), args.name or args.configs[0].name
    else:
        if missing := [str(c) for c in args.configs if not c.is_file()]:
            raise ConfigError(f"no such config file or experiment directory: {', '.join(missing)}.")
        variants_ = {label: [f"--config={c}"] for label, c in labels(args.configs).items()}
        name = args.name or "compare"
    directory = args.logs / name
    directory.mkdir(parents=True, exist_ok=True)  # the table is written even when every run fails
    seeds = [None] if args.seeds == 1 else list(range(args.seeds))
    folds = [None] if args.folds == 1 else list(range(args.folds))
    if folds != [None]:  # before any run: a data module without folds cannot take part
        first = next(iter(variants_.values()))
        try:
            resolve([*first, f"--data.folds={args.folds}", "--data.fold=0", *extra], "compare --folds")
        except ConfigError as err:
            if "folds" in str(err):
                raise ConfigError(f"{err}. compare --folds sets data.folds and data.fold: the data module needs both "
                                  "arguments, as project.data.ImageDataModule has.") from None  # fmt: skip
    todo = [(v, s, k) for v in variants_ for s in seeds for k in folds]
    results: dict[str, list[dict]] = {v: [] for v in variants_}
    failures: dict[str, str] = {}
    for i, (variant, seed, fold) in enumerate(todo, 1):
        run = "/".join([variant, *([f"seed_{seed}"] if seed is not None else []),
                        *([f"fold_{fold}"] if fold is not None else [])])  # fmt: skip
        fit = [*variants_[variant], *([] if seed is None else [f"--seed_everything={seed}"]),
               *([] if fold is None else [f"--data.folds={args.folds}", f"--data.fold={fold}"]), *extra]  # fmt: skip
        try:  # what would train now: a finished run is reused only if it trained exactly this
            config = yaml.safe_load(resolve(fit, f"variant {run}"))
        except ConfigError as err:
            config, error = None, str(err)
        else:
            done = None if args.rerun else finished(directory / run, config)
            print(f"[{i}/{len(todo)}] {name}/{run}: {'reusing ' + str(done) if done else 'training'}", flush=True)
            error = None if done else train(run, [*fit, *placement(config, directory, run)], directory)
            if error is None and (done := finished(directory / run)) is None:
                error = "the run ended before its test"
        if error:
            failures.setdefault(variant, error)
            print(f"[{i}/{len(todo)}] {name}/{run}: FAILED, {error}", flush=True)
        else:
            results[variant].append({**summarize(variant, done), "pair": (seed, fold)})
    repeats = len(seeds) * len(folds)
    if repeats == 1:
        rows = [{"run": v, "status": f"failed, {failures[v]}"} if v in failures else results[v][0] for v in variants_]
        table = write_tables(rows, directory)
    else:
        paired = folds != [None]
        rows, target = table_of_seeds(results, failures, args.target, paired)
        runs = " x ".join([f"{len(seeds)} seeds"] * (seeds != [None]) + [f"{len(folds)} folds"] * paired)
        test = ("a paired t-test of test acc against the best mean, the runs paired by fold (and seed)" if paired
                else "Welch's t-test of test acc against the best mean")  # fmt: skip
        caption = (f"{runs} per variant; mean +- sd; the target of 'to target' is val acc {target:.4f}; p: "
                   f"{test}.\n\n")  # fmt: skip
        columns = SEED_COLUMNS
        if paired:  # runs of seeds and folds
            columns = [{"seeds ok": "runs ok", "p vs best (Welch)": "p vs best (paired)"}.get(c, c) for c in columns]
            for row in rows:
                row["runs ok"] = row.get("seeds ok")
        table = write_tables(rows, directory, columns, caption)
    ok = [row for row in rows if row["status"] == "ok"]
    if ok:
        plot(ok, directory / "curves.png", name + ("" if repeats == 1 else f", mean +- sd of {repeats} runs"))
    if differences := differing([r for v in results for r in results[v]]):
        table += "\nThe runs differ in what they ran on (run.json):\n\n" + differences
        (directory / "comparison.md").write_text(table)
    print(f"\n{table}\nWrote {directory / 'comparison.md'}, comparison.csv" + (", curves.png" if ok else ""))
    if failures:
        sys.exit(1)


def labels(configs: list[Path]) -> dict[str, Path]:
    """A variant's name for each config file: its stem, or where two share one (``a/default.yaml``,
    ``b/default.yaml``), its path without the suffix, so that no variant replaces another."""
    stems = [c.stem for c in configs]
    named = {}
    for config in configs:
        label = config.stem if stems.count(config.stem) == 1 else str(config.with_suffix("")).strip("./")
        named[label.replace("/", "-")] = config
    if len(named) < len(configs):
        raise ConfigError(f"compare: {', '.join(map(str, configs))} name the same config more than once.")
    return named


ENVIRONMENT = {
    "code": lambda e: {
        p: f"{c['commit'][:10]}{' +changes' if c['dirty'] else ''}" for p, c in e.get("code", {}).items()
    },
    "torch": lambda e: e.get("torch", {}).get("version"),
    "CUDA / cuDNN": lambda e: f"{e.get('torch', {}).get('cuda')} / {e.get('torch', {}).get('cudnn')}",
    "devices": lambda e: e.get("torch", {}).get("devices"),
    "machine": lambda e: f"{e.get('machine', {}).get('host')} ({e.get('machine', {}).get('system')})",
    "data": lambda e: e.get("data"),
}


def differing(rows: list[dict]) -> str:
    """A table of what the runs' ``run.json`` says they ran on, for what differs between them (the packages by name),
    or an empty string."""
    environments = {(row["run"], i): row.get("environment") or {} for i, row in enumerate(rows)}
    lines = []
    for label, read in ENVIRONMENT.items():
        values = {key: json.dumps(read(e), sort_keys=True) for key, e in environments.items()}
        if len(set(values.values())) > 1:
            lines += [f"| {label} | {run} | {value} |" for (run, _), value in values.items()]
    packages = [e.get("packages", {}) for e in environments.values()]
    changed = sorted(n for n in set().union(*packages) if len({p.get(n) for p in packages}) > 1) if packages else []
    for name in changed:
        lines += [
            f"| package {name} | {run} | {e.get('packages', {}).get(name)} |" for (run, _), e in environments.items()
        ]
    return "| what | run | value |\n|---|---|---|\n" + "\n".join(lines) + "\n" if lines else ""


def table_of_seeds(
    results: dict[str, list[dict]], failures: dict[str, str], target: float | None, paired: bool = False
) -> tuple[list[dict], float]:
    """One row per variant over its seeds and folds (a variant with a failed run is listed as failed), and the
    target; ``paired`` (folds): the p-value of a paired t-test against the best, run by run of the same fold."""
    complete = {v: runs for v, runs in results.items() if v not in failures}
    if target is None and complete:
        target = min(max(v for _, v in r["val acc at"]) for runs in complete.values() for r in runs)
    rows = [aggregate(v, runs, target) for v, runs in complete.items()]
    if rows:
        best = max(rows, key=lambda r: statistics.fmean(r["test accs"]))
        for row in rows:
            p = paired_t(row["by pair"], best["by pair"]) if paired else welch(row["test accs"], best["test accs"])
            shown = "n/a" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"
            row["p vs best (paired)" if paired else "p vs best (Welch)"] = "best" if row is best else shown
    failed = [{"run": v, "status": f"failed, {e}", "seeds ok": len(results[v])} for v, e in failures.items()]
    return rows + failed, math.nan if target is None else target
