"""``python -m project {fit,validate,test,predict}``: LightningCLI over one config, plus ``resume``.

Configs stack (``--config a.yaml --config b.yaml``); ``--print_config`` shows the resolved one, which is
also saved as ``config.yaml`` in the run directory ``logs/<name>/version_<n>/``.
"""

import re
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningCLI

from project.callbacks import CSVPredictionWriter, TensorBoardReport
from project.checkpoint import SafeModelCheckpoint, check_weights_only
from project.data import ImageDataModule
from project.errors import ConfigError, ProjectError
from project.module import ImageClassifier

# The data is served from memory in whole batches: worker processes would only add copies.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Lightning 2.6 builds torch pytrees the way torch 2.14 deprecates; nothing a user of the template can change.
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated")

TRAINER_DEFAULTS = {
    "max_epochs": 20,
    "log_every_n_steps": 50,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "default", "default_hp_metric": False},
    },
    # appended to every run's callbacks, whatever the config's trainer.callbacks says
    "callbacks": [CSVPredictionWriter(), TensorBoardReport()],
}
# trainer.callbacks unless a config replaces the list (add to it with --trainer.callbacks+=CLASS)
DEFAULT_CALLBACKS = [
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
    {"class_path": "project.callbacks.ProgressBar"},
    {"class_path": "lightning.pytorch.callbacks.RichModelSummary", "init_args": {"max_depth": 2}},
]


# argparse would take --trainer.max_epoch (a typo) as --trainer.max_epochs; and a one-line usage instead of
# the 100-line one argparse prints above every error
PARSER_KWARGS = {
    "prog": "python -m project",
    "description": "Train, validate, test and predict image classifiers; `resume RUN_DIR` continues a run.",
    "allow_abbrev": False,
    **{
        command: {
            "allow_abbrev": False,
            "usage": f"python -m project {command} [-c CONFIG.yaml ...] [--KEY VALUE ...]",
        }
        for command in ("fit", "validate", "test", "predict")
    },
}


class CLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` on :class:`ImageDataModule`, with the checkpoint and
    early-stopping callbacks always on (configured under ``checkpoint:`` and ``early_stopping:``)."""

    def __init__(self, args: list[str] | None = None, **kwargs):
        super().__init__(
            ImageClassifier,
            ImageDataModule,
            args=args,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},  # a resumed run writes into its own directory again
            parser_kwargs=PARSER_KWARGS,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.callbacks": DEFAULT_CALLBACKS})
        parser.add_lightning_class_args(SafeModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {"early_stopping.monitor": "val/acc", "early_stopping.mode": "max", "early_stopping.patience": 5}
        )
        parser.link_arguments("data.shape", "model.in_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # resolved here, before LightningCLI reads the model's hyperparameters from the checkpoint
        config = self.config.get(self.config.get("subcommand") or "", {})
        if config and config.get("ckpt_path"):
            logger = config.trainer.logger
            root = Path(logger.init_args.save_dir) / logger.init_args.name if _is_tensorboard(logger) else None
            path = resolve_checkpoint(config.ckpt_path, root)
            check_weights_only(path)
            config.ckpt_path = str(path)
            # a checkpoint of a run under logs/ continues that run's directory and TensorBoard run
            if root is not None and path.parent.name == "checkpoints" and path.parents[2].resolve() == root.resolve():
                logger.init_args.version = path.parent.parent.name

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.enable_progress_bar is False:  # the flag wins over the default Rich bar
            callbacks = config.trainer.callbacks or []
            config.trainer.callbacks = [c for c in callbacks if not c.class_path.endswith("ProgressBar")]

    def before_fit(self) -> None:
        known = self.model.metric_names
        for key, monitor in (
            ("checkpoint.monitor", self.trainer.checkpoint_callback.monitor),
            ("early_stopping.monitor", self.trainer.early_stopping_callback.monitor),
            ("model.scheduler_monitor", self.model.hparams.scheduler_monitor),
        ):
            if monitor is not None and monitor not in known:
                raise ConfigError(f"{key}={monitor!r} is never logged; choose one of {', '.join(sorted(known))}.")

    def after_fit(self) -> None:
        """Test the best checkpoint (not the last weights), unless fit was a dry run that saved none."""
        best = self.trainer.checkpoint_callback.best_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def _is_tensorboard(logger) -> bool:
    return bool(logger) and not isinstance(logger, list) and logger.class_path.endswith("TensorBoardLogger")


def resolve_checkpoint(ckpt: str, root: Path | None) -> Path:
    """A checkpoint file from ``last``/``best`` (of the newest run under ``root``) or a path."""
    if ckpt not in ("last", "best"):
        if not Path(ckpt).is_file():
            raise ConfigError(f"--ckpt_path {ckpt}: no such file.")
        return Path(ckpt)
    runs = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=_version) if root else []
    if not runs:
        raise ConfigError(
            f"--ckpt_path {ckpt}: no run under {root or 'the logger directory'} has a checkpoints/last.ckpt yet; "
            "train first, or give the path of a .ckpt file."
        )
    last = runs[-1]
    if ckpt == "last":
        return last
    import torch

    callbacks = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
    best = next((Path(s["best_model_path"]) for s in callbacks.values() if s.get("best_model_path")), None)
    # by name, inside this run: the run directory may have moved since it was written
    if best is None or not (last.parent / best.name).is_file():
        raise ConfigError(f"--ckpt_path best: {last.parent} holds no best checkpoint; use --ckpt_path last.")
    return last.parent / best.name


def _version(path: Path) -> int:
    return int(re.sub(r"\D", "", path.parent.parent.name) or -1)


def _resume_args(argv: list[str]) -> list[str]:
    """``resume RUN_DIR [overrides]`` -> ``fit --config RUN_DIR/config.yaml --ckpt_path RUN_DIR/.../last.ckpt``."""
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: python -m project resume logs/<name>/version_<n> [--key value ...]")
    run = Path(argv[0])
    config, last = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    for needed in (config, last):
        if not needed.is_file():
            raise ConfigError(f"resume {run}: {needed} does not exist; give a run directory under logs/.")
    return ["fit", "--config", str(config), "--ckpt_path", str(last), *argv[1:]]


def main(args: list[str] | None = None) -> None:
    try:
        if args is None and sys.argv[1:2] == ["resume"]:
            sys.argv[1:] = _resume_args(sys.argv[2:])  # DDP launches its other ranks from sys.argv
        elif args is not None and args[:1] == ["resume"]:
            args = _resume_args(args[1:])
        CLI(args=args)
    except ProjectError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
