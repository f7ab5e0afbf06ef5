"""``python -m project compare``: train configs side by side and compare them as a table and pictures.

    python -m project compare configs/experiments/regularization            # each variant over base.yaml
    python -m project compare configs/a.yaml configs/b.yaml --name mine     # whole configs
    python -m project compare configs/experiments/optimizers -- --trainer.max_epochs=5   # args for every run
    python -m project compare configs/experiments/optimizers --seeds 3      # each variant 3 times: mean +- std

Each variant trains as ``logs/experiments/<name>/<variant>/version_<n>`` (``<variant>/seed_<s>/version_<n>`` with
``--seeds``; a finished run there is reused unless ``--rerun``); then ``comparison.md``, ``comparison.csv`` and
``curves.png`` are written beside them, read from the TensorBoard event files. Point TensorBoard at
``logs/experiments/<name>`` to compare the runs there.

With ``--seeds N`` (N >= 2), every variant trains with ``seed_everything`` 0..N-1 (the weights, the data order, dropout
and augmentation change; the train/val split, seeded by ``data.split_seed``, does not), and the table gives per variant
the mean +- standard deviation and the 95% confidence interval of the mean (Student's t, N-1 degrees of freedom) of
each metric, the epochs and seconds to a target validation accuracy, and Welch's t-test of its test accuracy against
the variant with the best mean: the runs of two variants are independent samples whose spread may differ (a big net's
more than a small one's), which is what Welch's test assumes and Student's equal-variance test does not; with 3 seeds it
can only detect differences several times the seed noise. The curves show each variant's mean with a band of +- one
standard deviation.
"""

import argparse
import csv
import math
import statistics
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from project.commands.experiments import variants
from project.errors import ConfigError
from project.runs import newest_first

COLUMNS = ["run", "status", "best val acc", "best epoch", "test acc", "train-val gap", "epochs", "wall s", "params"]
CURVES = {"train loss": "train/loss_epoch", "val loss": "val/loss", "train acc": "train/acc", "val acc": "val/acc"}


def scalars(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """``{tag: [(wall_time, value), ...]}`` of every scalar in a run's event files."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.wall_time, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def finished(root: Path) -> Path | None:
    """The newest run under ``root`` that got as far as its test."""
    return next((run for run in newest_first(root) if "test/acc" in scalars(run)), None)


def summarize(name: str, run_dir: Path) -> dict:
    s = scalars(run_dir)
    val = [v for _, v in s["val/acc"]]
    best = max(range(len(val)), key=val.__getitem__)
    times = [t for points in s.values() for t, _ in points]
    return {
        "run": name,
        "status": "ok",
        "best val acc": round(val[best], 4),
        "best epoch": best,
        "test acc": round(s["test/acc"][-1][1], 4),
        "train-val gap": round(s["train/acc"][-1][1] - val[-1], 4),
        "epochs": len(val),
        "wall s": round(max(times) - min(times), 1),
        "params": int(s["model/params"][-1][1]),
        "curves": {label: [v for _, v in s[tag]] for label, tag in CURVES.items()},
        "val acc at": [(t - min(times), v) for t, v in s["val/acc"]],  # (seconds since the run began, val acc)
    }


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


def train(name: str, config_args: list[str], save_dir: Path, extra: list[str]) -> str | None:
    """Runs one variant's fit, its progress bar on this terminal; returns the last error line if it failed."""
    log = save_dir / f"{name}.stderr.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "project", "fit", *config_args, f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.logger.init_args.name={name}", *extra]  # fmt: skip
    with open(log, "w") as err:
        code = subprocess.run(args, stderr=err).returncode
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


SEED_COLUMNS = ["run", "seeds ok", "test acc", "test acc 95% CI", "p vs best (Welch)", "best val acc", "train-val gap",
                "epochs to target", "s to target", "wall s", "params"]  # fmt: skip


def aggregate(variant: str, runs: list[dict], target: float) -> dict:
    """One row for a variant's seeds: each metric as mean +- sd, the test accuracy's 95% CI, time to ``target``."""
    row = {"run": variant, "status": "ok", "seeds ok": len(runs), "params": runs[0]["params"],
           "test accs": [r["test acc"] for r in runs], "seed curves": [r["curves"] for r in runs]}  # fmt: skip
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
    parser.add_argument("--target", type=float, help="val acc to time (default: the lowest best val acc of all runs)")
    args = parser.parse_args(argv[1 : argv.index("--")] if "--" in argv else argv[1:])
    if args.seeds < 1:
        raise ConfigError(f"compare --seeds {args.seeds}: give 1 or more runs per variant.")

    if len(args.configs) == 1 and args.configs[0].is_dir():
        variants_, name = variants(args.configs[0]), args.name or args.configs[0].name
    else:
        if missing := [str(c) for c in args.configs if not c.is_file()]:
            raise ConfigError(f"no such config file or experiment directory: {', '.join(missing)}.")
        variants_, name = {c.stem: [f"--config={c}"] for c in args.configs}, args.name or "compare"
    directory = args.logs / name
    seeds = [None] if args.seeds == 1 else list(range(args.seeds))
    runs = [(v, s) for v in variants_ for s in seeds]
    results: dict[str, list[dict]] = {v: [] for v in variants_}
    failures: dict[str, str] = {}
    for i, (variant, seed) in enumerate(runs, 1):
        run = variant if seed is None else f"{variant}/seed_{seed}"
        done = None if args.rerun else finished(directory / run)
        print(f"[{i}/{len(runs)}] {name}/{run}: {'reusing ' + str(done) if done else 'training'}", flush=True)
        seeded = [] if seed is None else [f"--seed_everything={seed}"]
        error = None if done else train(run, [*variants_[variant], *seeded], directory, extra)
        if error is None and (done := finished(directory / run)) is None:
            error = "the run ended before its test"
        if error:
            failures.setdefault(variant, error)
            print(f"[{i}/{len(runs)}] {name}/{run}: FAILED, {error}", flush=True)
        else:
            results[variant].append(summarize(variant, done))
    if seeds == [None]:
        rows = [{"run": v, "status": f"failed, {failures[v]}"} if v in failures else results[v][0] for v in variants_]
        table = write_tables(rows, directory)
    else:
        rows, target = table_of_seeds(results, failures, args.target)
        caption = (f"{len(seeds)} seeds per variant; mean +- sd; the target of 'to target' is val acc {target:.4f}; "
                   "p: Welch's t-test of test acc against the best mean.\n\n")  # fmt: skip
        table = write_tables(rows, directory, SEED_COLUMNS, caption)
    ok = [row for row in rows if row["status"] == "ok"]
    if ok:
        plot(ok, directory / "curves.png", name + ("" if seeds == [None] else f", mean +- sd of {len(seeds)} seeds"))
    print(f"\n{table}\nWrote {directory / 'comparison.md'}, comparison.csv" + (", curves.png" if ok else ""))
    if failures:
        sys.exit(1)


def table_of_seeds(
    results: dict[str, list[dict]], failures: dict[str, str], target: float | None
) -> tuple[list[dict], float]:
    """One row per variant over its seeds (a variant with a failed seed is listed as failed), and the target."""
    complete = {v: runs for v, runs in results.items() if v not in failures}
    if target is None and complete:
        target = min(max(v for _, v in r["val acc at"]) for runs in complete.values() for r in runs)
    rows = [aggregate(v, runs, target) for v, runs in complete.items()]
    if rows:
        best = max(rows, key=lambda r: statistics.fmean(r["test accs"]))
        for row in rows:
            p = welch(row["test accs"], best["test accs"])
            shown = "n/a" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"
            row["p vs best (Welch)"] = "best" if row is best else shown
    failed = [{"run": v, "status": f"failed, {e}", "seeds ok": len(results[v])} for v, e in failures.items()]
    return rows + failed, math.nan if target is None else target
