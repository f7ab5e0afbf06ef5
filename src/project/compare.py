"""``python -m project compare``: train configs side by side and compare them as a table and pictures.

    python -m project compare configs/experiments/regularization            # each variant over base.yaml
    python -m project compare configs/a.yaml configs/b.yaml --name mine     # whole configs
    python -m project compare configs/experiments/optimizers -- --trainer.max_epochs=5   # args for every run

Each variant trains as ``logs/experiments/<name>/<variant>/version_<n>`` (a finished run there is reused unless
``--rerun``); then ``comparison.md``, ``comparison.csv`` and ``curves.png`` are written beside them, read from the
TensorBoard event files. Point TensorBoard at ``logs/experiments/<name>`` to compare the runs there.
"""

import argparse
import csv
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from project.errors import ConfigError
from project.experiments import variants

COLUMNS = ["run", "status", "best val acc", "best epoch", "test acc", "train-val gap", "epochs", "wall s", "params"]
CURVES = {"train loss": "train/loss_epoch", "val loss": "val/loss", "train acc": "train/acc", "val acc": "val/acc"}


def scalars(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """``{tag: [(wall_time, value), ...]}`` of every scalar in a run's event files."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.wall_time, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def finished(root: Path) -> Path | None:
    """The newest run under ``root`` that got as far as its test."""
    runs = sorted(root.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]), reverse=True)
    return next((run for run in runs if "test/acc" in scalars(run)), None)


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
    }


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
            values = row["curves"][label]
            ax.plot(range(len(values)), values, marker=".", label=row["run"])
        ax.set(title=label, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def write_tables(rows: list[dict], directory: Path) -> str:
    with open(directory / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |" for row in rows]
    table = "\n".join(lines) + "\n"
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
    args = parser.parse_args(argv[1 : argv.index("--")] if "--" in argv else argv[1:])

    if len(args.configs) == 1 and args.configs[0].is_dir():
        runs, name = variants(args.configs[0]), args.name or args.configs[0].name
    else:
        if missing := [str(c) for c in args.configs if not c.is_file()]:
            raise ConfigError(f"no such config file or experiment directory: {', '.join(missing)}.")
        runs, name = {c.stem: [f"--config={c}"] for c in args.configs}, args.name or "compare"
    directory = args.logs / name
    rows = []
    for i, (variant, config_args) in enumerate(runs.items(), 1):
        done = None if args.rerun else finished(directory / variant)
        print(f"[{i}/{len(runs)}] {name}/{variant}: {'reusing ' + str(done) if done else 'training'}", flush=True)
        error = None if done else train(variant, config_args, directory, extra)
        if error is None and (done := finished(directory / variant)) is None:
            error = "the run ended before its test"
        rows.append({"run": variant, "status": f"failed, {error}"} if error else summarize(variant, done))
        if error:
            print(f"[{i}/{len(runs)}] {name}/{variant}: FAILED, {error}", flush=True)
    table = write_tables(rows, directory)
    ok = [row for row in rows if row["status"] == "ok"]
    if ok:
        plot(ok, directory / "curves.png", name)
    print(f"\n{table}\nWrote {directory / 'comparison.md'}, comparison.csv" + (", curves.png" if ok else ""))
    if len(ok) < len(rows):
        sys.exit(1)
