"""``python -m project lr-plot``: the learning rate of every optimizer step that ``fit`` would take with a config,
as a PNG, without training (seed 004's ``plot_lr``, for any scheduler, warm restarts and one-cycle included).

    python -m project lr-plot --config configs/schedulers/cosine_warm_restarts.yaml
    python -m project lr-plot configs/experiments/schedulers      # one curve per variant
"""

import argparse
from pathlib import Path

import torch

from project.commands.experiments import variants
from project.configs import config_stems


def schedule(config_args: list[str]) -> tuple[list[float], list[float]]:
    """``(epoch, learning rate)`` at each optimizer step of the run these config arguments describe."""
    from project.cli import CLI

    cli = CLI(args=config_args, command="lr-plot")
    model, data, epochs = cli.model, cli.datamodule, cli.trainer.max_epochs
    if hasattr(data, "steps_per_epoch"):
        per_epoch = data.steps_per_epoch()
    else:  # optional in a data module (project.data.ImageData): its training batches counted
        data.prepare_data()
        data.setup("fit")
        per_epoch = len(data.train_dataloader())
    optimizer = model.optimizer([torch.zeros(1, requires_grad=True)])
    scheduler = model.build_scheduler(optimizer, per_epoch * epochs, epochs) if model.scheduler else None
    by_step = model.hparams.scheduler_interval == "step"
    x, lr = [], []
    for epoch in range(epochs):
        for step in range(per_epoch):
            x.append(epoch + step / per_epoch)
            lr.append(optimizer.param_groups[0]["lr"])
            optimizer.step()  # no gradients: changes nothing, but keeps the scheduler's call order check quiet
            if scheduler is not None and by_step:
                scheduler.step()
        if scheduler is not None and not by_step:
            # ReduceLROnPlateau sees a metric that never improves, so every reduction shows
            plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            scheduler.step(1.0) if plateau else scheduler.step()
    return x, lr


def plot(curves: dict[str, tuple[list[float], list[float]]], out: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    for name, (x, lr) in curves.items():
        ax.plot(x, lr, label=name)
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def main(argv: list[str]) -> None:
    """``argv``: ``lr-plot`` and its arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m project lr-plot",
        usage="python -m project lr-plot [EXPERIMENT_DIR] [--config CONFIG.yaml ...] [--KEY VALUE ...] [--out PNG]",
        description=__doc__.split("\n\n")[0],
        epilog="Without an experiment directory: configs/default.yaml's schedule, with the configs and flags given.",
    )
    parser.add_argument("--out", type=Path, help="the PNG to write")
    args, rest = parser.parse_known_args(argv[1:])
    # a first argument that is not an option names an experiment; everything else goes to the config parser
    experiment = Path(rest.pop(0)) if rest and not rest[0].startswith("-") else None
    if experiment:
        curves = {name: schedule([*stack, *rest]) for name, stack in variants(experiment).items()}
        out, title = args.out or Path("logs/experiments") / experiment.name / "lr.png", experiment.name
    else:
        configs = config_stems(rest)
        name = configs[-1] if configs else "default"
        curves = {name: schedule(rest)}
        out, title = args.out or Path("logs/lr-plot") / f"{name}.png", " + ".join(["default", *configs])
    plot(curves, out, title)
    print(f"Wrote {out}")
