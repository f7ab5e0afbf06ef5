"""``python -m project lr-find`` and ``batch-size-find``: Lightning's learning-rate finder and batch-size finder on
any config, each writing what it found as a config file that stacks on the configs it ran with.

    python -m project lr-find --config configs/fashion_mnist_fast.yaml
    python -m project fit --config configs/fashion_mnist_fast.yaml --config logs/lr-find/fashion_mnist_fast.yaml

lr-find trains ``--steps`` batches with the learning rate growing exponentially from ``--min_lr`` to ``--max_lr``,
plots the loss against it and suggests the rate where the loss falls fastest against log(lr) (:func:`suggest`); the
config sets the optimizer's ``lr`` (also one-cycle's peak). batch-size-find doubles ``data.batch_size`` from
the config's for as long as a few training steps run (on a GPU: until its memory runs out), trying at most
``--max_trials`` sizes, and no more than the training set's size; the config sets ``data.batch_size``. Neither writes a
run directory or a checkpoint; the weights they trained are thrown away.
"""

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

from project.configs import config_stems
from project.errors import ConfigError


def _tuner(config_args: list[str], command: str, workdir: str):
    """The config's model and data, and a Trainer on one device that writes nothing (no logger, no checkpoints)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.tuner import Tuner

    from project.cli import CLI

    cli = CLI(args=config_args, command=command)
    # the finders train a few steps each: the lr finder puts its own schedule in the config's place, the batch-size
    # finder needs none, and a schedule planned over a run's length (one-cycle) has no run to plan for here
    cli.model.scheduler = None
    trainer = Trainer(
        accelerator=cli.config.trainer.accelerator,
        precision=cli.config.trainer.precision,
        devices=1,
        max_epochs=-1,  # as many epochs as the finder's steps take: a small folder has few batches an epoch
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=workdir,  # where the finders keep the weights they restore at the end
    )
    return cli, Tuner(trainer)


# Lightning's smoothed loss starts low (its bias correction counts one step too many), so its first points are skipped
SKIP = 10


def suggest(lrs: torch.Tensor, losses: torch.Tensor) -> float | None:
    """The learning rate where the smoothed loss falls fastest against log(lr), before its lowest point. Lightning's
    own suggestion takes the slope against lr itself, which favours the smallest rates, where a step in lr is tiny
    (Lightning issue 21141, since its PR 21055 in 2.5.3; PR 21171, open, would take it against log(lr))."""
    finite = losses.isfinite()
    lrs, losses = lrs[finite][SKIP:], losses[finite][SKIP:]
    if len(losses) < 3:
        return None
    end = int(losses.argmin()) + 1
    if end < 3:
        return None
    slope = torch.gradient(losses[:end], spacing=[lrs[:end].log()])[0]
    return float(lrs[int(slope.argmin())]) if slope.min() < 0 else None


def plot(lrs: torch.Tensor, losses: torch.Tensor, lr: float, out: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    ax.plot(lrs[SKIP:], losses[SKIP:])
    ax.axvline(lr, color="red", linestyle="--", label=f"suggested {lr:g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)", title=f"lr-find: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def _write(path: Path, comment: str, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"# {line}\n" for line in comment.splitlines()) + yaml.safe_dump(config, sort_keys=False))


def main(argv: list[str]) -> None:
    """``argv``: ``lr-find`` or ``batch-size-find``, then its arguments."""
    command = argv[0]
    parser = argparse.ArgumentParser(
        prog=f"python -m project {command}",
        usage=f"python -m project {command} [--config CONFIG.yaml ...] [--KEY VALUE ...] [--out YAML]",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, help=f"the config to write (default: logs/{command}/<config>.yaml)")
    if command == "lr-find":
        parser.add_argument("--min_lr", type=float, default=1e-7, help="the first learning rate tried (1e-7)")
        parser.add_argument("--max_lr", type=float, default=1.0, help="the last learning rate tried (1)")
        parser.add_argument("--steps", type=int, default=100, help="training steps, one learning rate each (100)")
    else:
        parser.add_argument("--max_trials", type=int, default=8, help="batch sizes tried at most (8)")
    args, rest = parser.parse_known_args(argv[1:])
    name = (config_stems(rest) or ["default"])[-1]
    out = args.out or Path("logs") / command / f"{name}.yaml"
    stack = " ".join(rest)
    with tempfile.TemporaryDirectory() as workdir:
        if command == "lr-find":
            if not 0 < args.min_lr < args.max_lr or args.steps < 2:
                raise ConfigError("lr-find: give 0 < --min_lr < --max_lr and --steps of 2 or more.")
            cli, tuner = _tuner(rest, command, workdir)
            finder = tuner.lr_find(cli.model, datamodule=cli.datamodule, min_lr=args.min_lr, max_lr=args.max_lr,
                                   num_training=args.steps, update_attr=False)  # fmt: skip
            lrs, losses = torch.tensor(finder.results["lr"]), torch.tensor(finder.results["loss"])
            lr = suggest(lrs, losses)
            if lr is None:
                ran = f"{len(lrs)} steps" + (f" (of --steps {args.steps})" if len(lrs) < args.steps else "")
                raise ConfigError(
                    f"lr-find: the loss did not fall over {ran} from {args.min_lr:g} to {args.max_lr:g} (or it "
                    "diverged at once): no learning rate to suggest. Try more --steps or another range."
                )
            lr = float(f"{lr:.3g}")
            found = {"model": {"optimizer": {"init_args": {"lr": lr}}}}  # also one-cycle's peak (one knob)
            plot(lrs, losses, lr, out.with_suffix(".png"), name)
            what = (f"learning rate {lr:g}: where the training loss fell fastest (per factor of learning rate) over "
                    f"{args.steps} steps from {args.min_lr:g} to {args.max_lr:g}, before its lowest point")  # fmt: skip
        else:
            if args.max_trials < 1:
                raise ConfigError("batch-size-find: give --max_trials of 1 or more.")
            cli, tuner = _tuner(rest, command, workdir)
            # where Lightning's finder looks for it: the data module's attribute, or its hyperparameter
            data = cli.datamodule
            first = getattr(data, "batch_size", None) or getattr(data, "hparams", {}).get("batch_size")
            if not isinstance(first, int):
                raise ConfigError(
                    f"batch-size-find tunes the data module's batch_size, and {type(cli.datamodule).__qualname__} has "
                    "none, as an attribute or an init argument (project.data.ImageData)."
                )
            size = tuner.scale_batch_size(cli.model, datamodule=cli.datamodule, mode="power", init_val=first,
                                          max_trials=args.max_trials)  # fmt: skip
            found = {"data": {"batch_size": int(size)}}
            what = (f"batch size {size}: the largest that trained of at most {args.max_trials} sizes, doubling from "
                    f"the config's {first} (Lightning's batch-size finder)")  # fmt: skip
    _write(out, f"python -m project {command} {stack}\n{what}.\nStack it: python -m project fit {stack} --config {out}",
           found)  # fmt: skip
    print(f"{command}: {what}.\nWrote {out}" + (f" and {out.with_suffix('.png')}" if command == "lr-find" else ""))
    print(f"Train with it: python -m project fit {stack + ' ' if stack else ''}--config {out}")
