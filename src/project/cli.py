"""``fit``, ``validate``, ``test``, ``predict`` (LightningCLI) and ``resume``.

``configs/default.yaml`` is the first config of every run: ``--config`` files and ``--KEY VALUE`` flags stack on
top of it, and ``--print_config`` shows the result, which is also saved as ``config.yaml`` in the run directory
``logs/<name>/version_<n>/``.
"""

import re
import sys
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from project import record, runs
from project.callbacks import CSVPredictionWriter, EarlyStopping, Report
from project.checkpoint import SafeModelCheckpoint
from project.configs import DEFAULT_CONFIG, check_config_files, check_unquoted_pattern
from project.data import ImageData
from project.data.datamodule import check as check_data
from project.errors import ConfigError
from project.files import replacing
from project.module import ImageClassifier
from project.module import check as check_model
from project.record import MetricsRecord
from project.runs import read_checkpoint
from project.signals import StopSignals

COMMANDS = ("fit", "validate", "test", "predict")
# the model's arguments whose state a checkpoint holds: a run that goes on from it cannot change them
STATEFUL = {
    "class_path",
    "net",
    "optimizer",
    "scheduler",
    "scheduler_interval",
    "body_lr_scale",
    "layer_decay",
    "norm_bias_decay",
    "class_weights",
}

# argparse would take --trainer.max_epoch (a typo) as --trainer.max_epochs; and a one-line usage instead of
# the 100-line one argparse prints above every error
PARSER_KWARGS = {
    "prog": "python -m project",
    "allow_abbrev": False,
    **{
        command: {
            "allow_abbrev": False,
            "default_config_files": [str(DEFAULT_CONFIG)],
            "usage": f"python -m project {command} [-c CONFIG.yaml ...] [--KEY VALUE ...]",
        }
        for command in COMMANDS
    },
}


# what jsonargparse says of a value beside the reason it was refused: which alternatives of a Union it tried
_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|Subtypes: \[|Errors:$|Given value( type)?: |"
    r"Problem with given class_path|Expected a <class 'NoneType'>|"
    r"Expected a path but .* either not accessible or invalid"
)


def condense(message: str) -> str:
    """jsonargparse's error for a config value, which in subclass mode is a tree of every Union alternative it tried
    (the model and data are ``Optional[...]``, a data source ``Source | Literal[...]``), as one line: the full key and
    the reasons at the deepest key, e.g. ``model.net: ... has no attribute 'Transformer'``."""
    stack: list[tuple[int, str]] = []  # (indent, key) of the "Parser key" lines above the current one
    leaves: list[tuple[str, str]] = []  # (full key, reason)
    given = ""
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        if text.startswith("Given value: ") and not re.match(r"Given value: (NestedArg|Namespace)\(", text):
            given = text.removeprefix("Given value: ")
        if not text or _NOISE.search(text):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if key := re.fullmatch(r'Parser key "(.+)":', text):
            stack.append((indent, key.group(1)))
        else:
            leaves.append((".".join(k for _, k in stack), text))
    if not stack and not any(key for key, _ in leaves):
        return message  # not a tree: "unrecognized arguments: ...", and the like
    deepest = max(key.count(".") + bool(key) for key, _ in leaves) if leaves else -1
    reasons = [(key, text) for key, text in leaves if key.count(".") + bool(key) == deepest]
    if not reasons:
        return message
    texts = list(dict.fromkeys(text for _, text in reasons))
    # the alternatives one reason lists below a line of its own that ends with ":"
    lead = next((i for i, text in enumerate(texts) if text.endswith(":")), len(texts))
    said = "; or ".join(texts[:lead]) + (" " + ", ".join(texts[lead:]) if lead < len(texts) else "")
    return f"{reasons[0][0]}: {said}" + (f" (given: {given})" if given and "Got value" not in said else "")


class Parser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        # the inner parsers of a class's arguments raise to the outer one, which says the whole of it
        super().error(condense(message) if self.exit_on_error else message, ex)


class SaveConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written whole or not at all into the run's directory (:func:`runs.directory`,
    whatever the logger: LightningCLI 2.6 writes it to ``trainer.log_dir``, an MLflow store's root), with ``run.json``
    beside it (:mod:`project.record`). A resumed run rewrites it (with the resume's overrides) only once it trains
    again: a resume that stops before (an override that cannot work) leaves the config as it was. (LightningCLI also
    refuses an existing one unless ``overwrite``: Lightning issue 17115.)"""

    def __init__(self, *args, resumed: bool = False, **kwargs):
        super().__init__(*args, save_to_log_dir=False, **kwargs)
        self.resumed = resumed

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.resumed:  # also not at the test after fit, for a resumed run that had nothing left to train
            super().setup(trainer, pl_module, stage)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")

    def save_config(self, trainer, pl_module, stage: str) -> None:
        directory = runs.directory(trainer)
        # without ckpt_path, the command's own: a later --config <run>/config.yaml would put back its null
        config = self.config.clone()
        config.pop("ckpt_path", None)
        with replacing(directory / self.config_filename) as f:
            f.write(self.parser.dump(config, skip_none=False, skip_check=True).encode())
        if trainer.state.fn == "fit":
            record.write(trainer, pl_module)


def _shape_of(data: ImageData) -> tuple[int, int, int]:
    check_data(data)  # the first thing read of an instantiated data module: a missing part is named here
    return tuple(data.shape)


def _classes_of(data: ImageData) -> list[str]:
    return list(data.classes)


def _multilabel_of(data: ImageData) -> bool:
    return bool(getattr(data, "multilabel", False))  # optional in a data module (project.data.ImageData)


class CLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` or a subclass (``--model FILE.Class``) on any LightningDataModule that
    meets :class:`project.data.ImageData` (``--data FILE.Class``; ``configs/default.yaml``'s is
    :class:`project.data.ImageDataModule`), with the checkpoint and early-stopping callbacks always on (configured under
    ``checkpoint:`` and ``early_stopping:``). The optimizer and scheduler are the model's own arguments
    (``model.optimizer``, ``model.scheduler``), the only place to set them. The net is sized from the instantiated data
    module (its ``shape`` and ``classes``), and a checkpoint is checked against that model before it is loaded."""

    def __init__(self, args: list[str] | None = None, command: str | None = None, **kwargs):
        """``command``: a command of ours that only builds what a config describes (``lr-plot``), without running
        a Trainer method; otherwise ``args`` start with fit, validate, test or predict."""
        # only the subcommand that runs gets a parser: each is built from every class's signature (0.08 s apiece)
        self.running = args[0] if args and args[0] in COMMANDS and command is None else None
        parser_kwargs = {k: v for k, v in PARSER_KWARGS.items() if k not in COMMANDS or k == self.running}
        if command:  # no subcommands: the main parser reads the default config itself
            usage = f"python -m project {command} [--config CONFIG.yaml ...] [--KEY VALUE ...]"
            parser_kwargs = {**PARSER_KWARGS, "default_config_files": [str(DEFAULT_CONFIG)], "usage": usage,
                             "prog": f"python -m project {command}"}  # fmt: skip
        try:
            super().__init__(
                ImageClassifier,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                run=command is None,
                # always there, whatever a config's trainer.callbacks says
                trainer_defaults={"callbacks": [Report(), MetricsRecord()]},
                save_config_callback=SaveConfig,
                parser_class=Parser,
                save_config_kwargs={"overwrite": True},  # a resumed run writes into its own directory again
                parser_kwargs=parser_kwargs,
                auto_configure_optimizers=False,
                **kwargs,
            )
        # Trainer flags that cannot work together or on this machine, or with the checkpoint a run resumes from (a
        # max_epochs it has passed), and data loaders Lightning cannot rebuild
        except MisconfigurationException as err:
            said = " ".join(str(err).split())
            if "batch_size" in said and "DataLoader" in said:  # Lightning issue 17991, open in 2.6
                said += (" A data module's DataLoader given its batch size by position cannot be rebuilt by Lightning "
                         "(which predict does): give it by keyword, DataLoader(dataset, batch_size=...).")  # fmt: skip
            raise ConfigError(f"Lightning cannot run this as set: {said}") from None

    def subcommands(self) -> dict[str, set[str]]:
        every = LightningCLI.subcommands()
        return {self.running: every[self.running]} if getattr(self, "running", None) else every

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SafeModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(CSVPredictionWriter, "predictions")
        parser.link_arguments("data", "model.init_args.in_shape", compute_fn=_shape_of, apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.classes", compute_fn=_classes_of, apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.multilabel", compute_fn=_multilabel_of, apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        # args is always a list here (main passes sys.argv's); LightningCLI would warn that both are set
        self.config = parser.parse_args(args)
        command = self.config.get("subcommand")
        config = self.config.get(command or "", {})
        if not config:
            return
        epochs = config.trainer.max_epochs
        if command == "fit" and epochs is not None and (epochs == 0 or epochs < -1):
            raise ConfigError(f"trainer.max_epochs={epochs} trains nothing: give 1 or more (or -1 to train until "
                              "trainer.max_steps or early stopping).")  # fmt: skip
        if command != "fit" and not config.get("ckpt_path"):  # Lightning would evaluate the untrained net
            raise ConfigError(
                f"{command} evaluates a trained model: give --ckpt_path best (the newest run's best checkpoint), last, "
                "or a .ckpt file (with --config <run>/config.yaml for another run's config)."
            )
        logger = runs.first_logger(config.trainer.logger)
        root = runs.root_of(logger, config.trainer.default_root_dir)
        first = rank_zero_only.rank == 0  # the other processes of a DDP run take rank 0's directories from it
        run = None
        # resolved here, before LightningCLI reads the model's hyperparameters from the checkpoint
        if config.get("ckpt_path"):
            # best or last of the run the config names (--config RUN/config.yaml), or else of the newest run: where
            # that was trained on other data, check_fits names the run that was not
            named = runs.named_run(logger, root) if config.ckpt_path in ("best", "last") else None
            self.newest = (config.ckpt_path, root) if config.ckpt_path in ("best", "last") and not named else None
            path = runs.resolve(config.ckpt_path, root, named)
            # a file that is no checkpoint is named here, before LightningCLI reads the hyperparameters in it
            self.checkpoint = read_checkpoint(path)
            config.ckpt_path = str(path)
            run = runs.run_of(path, self.checkpoint)
        if command == "fit" and run is not None:  # a checkpoint of a run belongs to it: fit continues that run
            runs.place(config, run)
            if first:
                runs.hold(path.parent)
        elif config.trainer.fast_dev_run:  # a dry run: Lightning writes nothing, and no directory is claimed for it
            pass
        elif first and run is None:  # a new run (or an evaluation of a checkpoint of none), a directory of its own
            run = runs.new(logger, root)
            runs.CLAIMED.append(run)
            runs.place(config, run)
        elif first:  # validate, test and predict write their own directory inside the run they evaluate, not into it
            sub = runs.claim(run, command)
            runs.CLAIMED.append(run / sub)
            runs.place(config, run, sub)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI 2.6.0 takes the model's arguments from the checkpoint over the command's (its PR 21116; PR
        21455, open, would make them defaults instead), silently: here a fit that continues a run (``resume``) keeps
        what its command line changes, except what the checkpoint's state fixes (the net, the optimizer and the
        scheduler, whose state comes back with it), which it refuses; an evaluation takes the checkpoint's model,
        but test-time augmentation, the evaluating command's choice. ``_parse_ckpt_path`` is LightningCLI's private
        step that applies the checkpoint's arguments."""
        command = self.config.get("subcommand")
        if not command or not self.config[command].get("ckpt_path"):
            return super()._parse_ckpt_path()
        given = self.config[command].model.clone()
        super()._parse_ckpt_path()
        model = self.config[command].model
        changed = [k for k, v in vars(given.init_args).items() if v != model.init_args.get(k)]  # the top-level keys
        if given.class_path != model.class_path:
            changed.insert(0, "class_path")
        if command != "fit":
            if "tta" in changed:
                model.init_args.tta = given.init_args.tta
            return
        if refused := [k for k in changed if k in STATEFUL]:
            raise ConfigError(
                f"model.{', model.'.join(refused)} cannot change when a run goes on from its checkpoint "
                f"{self.config[command].ckpt_path}: the checkpoint holds the state of the ones it was trained with "
                "(weights, optimizer, schedule). Train a new run with them instead (fit without --ckpt_path)."
            )
        for key in changed:  # honoured, and recorded in the run's config.yaml once it trains
            model.init_args[key] = given.init_args[key]

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.save_config_kwargs["resumed"] = self.subcommand == "fit" and bool(config.get("ckpt_path"))
        if str(config.trainer.accelerator) in ("gpu", "cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    "this config asks for a GPU (trainer.accelerator), but torch sees none on this machine. Run it on "
                    "a machine with a CUDA GPU, or add --config configs/trainer/cpu.yaml to run it on the CPU."
                )

    def instantiate_trainer(self, **kwargs):
        """The Trainer with the configured callbacks, less those its flags or its setup rule out: the flags win over
        the configured bar and summary; without a logger there is no learning rate to log; and a preset stacked twice
        (configs/tricks/ema.yaml on a config that has EMA already) means its callback once, with the later config's
        arguments (Lightning refuses two of a kind that keep state in checkpoints). Chosen among the instantiated
        callbacks, so that the saved config.yaml is the config as given."""
        from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar

        config = self._get(self.config_init, "trainer", default={})
        off = [kind for kind, flag in ((ProgressBar, "enable_progress_bar"), (ModelSummary, "enable_model_summary"))
               if config.get(flag) is False]  # fmt: skip
        if not config.get("logger"):
            off.append(LearningRateMonitor)
        given = [c for c in config.get("callbacks") or [] if not isinstance(c, tuple(off))]
        kept = [c for i, c in enumerate(given) if type(c) not in {type(later) for later in given[i + 1 :]}]
        if len(averaging := [type(c).__name__ for c in kept if isinstance(c, WeightAveraging)]) > 1:
            # each swaps its average into the model for validation and checkpoints: two of them swap each other's
            raise ConfigError(f"trainer.callbacks: {' and '.join(averaging)} both average the weights, and a run can "
                              "validate, save and resume one average only: choose one of them.")  # fmt: skip
        return super().instantiate_trainer(**{"callbacks": kept, **kwargs})

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse 4.53 tries each type of a Union (subclass mode's model and data are Optional[...]) and
            # raises "Does not validate against any of the Union subtypes" from what the class itself raised, and
            # "Call to compute_fn of link ... failed" from what a link raised: that exception is the one to report (a
            # ProjectError as its one paragraph, anything else with its traceback)
            cause = err
            wrapped = re.compile(r"Does not validate against any of the Union|Call to compute_fn")
            while isinstance(cause, ValueError) and cause.__cause__ is not None and wrapped.match(str(cause)):
                cause = cause.__cause__
            if cause is err:
                raise
            raise cause from None

    def after_instantiate_classes(self) -> None:
        check_model(self.model)
        if self.save_config_kwargs.get("resumed") and hasattr(self.model, "resuming"):
            self.model.resuming = True  # its weights come from the checkpoint: not from model.init_from
        runs.adopt(self.trainer)
        if getattr(self, "checkpoint", None) is not None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            try:
                check_fits(Path(config.ckpt_path), self.checkpoint, self.model)
            except ConfigError as err:
                if not self.newest:
                    raise
                which, root = self.newest
                fitting = next((c for r in runs.newest_first(root) if (c := _fitting(r, which, self.model))), None)
                also = f" The newest run of this data: --ckpt_path {fitting}" if fitting else ""
                raise ConfigError(f"--ckpt_path {which} took the newest run under {root}: {err}{also}") from None

    def before_fit(self) -> None:
        known = getattr(self.model, "metric_names", None)
        if known is None:  # a model that does not say what it logs: Lightning says so when a monitor is missing
            return
        for key, monitor in (
            ("checkpoint.monitor", self.trainer.checkpoint_callback.monitor),
            ("early_stopping.monitor", self.trainer.early_stopping_callback.monitor),
            ("model.scheduler_monitor", self.model.hparams.scheduler_monitor),
        ):
            if monitor is not None and monitor not in known:
                raise ConfigError(f"{key}={monitor!r} is never logged; choose one of {', '.join(sorted(known))}.")

    def after_fit(self) -> None:
        """Test the best checkpoint (not the last weights), unless fit was a dry run that saved none."""
        checkpoints = self.trainer.checkpoint_callback
        best = checkpoints.best_model_path
        if best and checkpoints.dirpath:  # by name, in this run: a resumed run's directory may have moved
            best = str(Path(checkpoints.dirpath) / Path(best).name)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def _fitting(run: Path, which: str, model) -> Path | None:
    """The run's ``best`` or ``last`` checkpoint if it has one that fits ``model``."""
    try:
        path = runs.checkpoint(run, which)
        check_fits(path, read_checkpoint(path), model)
    except ConfigError:
        return None
    return path


def check_fits(path: Path, checkpoint: dict, model) -> None:
    """A checkpoint trained for other images (shape) or other classes than the instantiated ``model`` (sized from the
    data module) cannot be loaded: one message that names the checkpoint and both sides."""
    hparams = checkpoint.get("hyper_parameters", {})
    if "classes" not in hparams:
        raise ConfigError(
            f"{path} was written by an earlier version of the template (its hyperparameters have no classes): train "
            "the run again with this version."
        )
    theirs, ours = list(hparams["classes"]), list(model.hparams.classes)
    if theirs != ours:
        raise ConfigError(
            f"{path} was trained on the {len(theirs)} classes {', '.join(theirs)}; the data now has {len(ours)}: "
            f"{', '.join(ours)}. Use the data it was trained on (--config <run>/config.yaml, and where the data moved, "
            "its new place), or a checkpoint of this data."
        )
    if tuple(hparams.get("in_shape", ())) != tuple(model.hparams.in_shape):
        raise ConfigError(
            f"{path} was trained on images of shape {tuple(hparams['in_shape'])}, and the data gives "
            f"{tuple(model.hparams.in_shape)}: use the config of the run that wrote it (--config <run>/config.yaml), "
            "or a checkpoint of this data."
        )


def _resume_args(argv: list[str]) -> list[str]:
    """``resume RUN_DIR [overrides]`` -> ``fit --config RUN_DIR/config.yaml --ckpt_path RUN_DIR/.../last.ckpt``."""
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: python -m project resume logs/<name>/version_<n> [--key value ...]")
    run = Path(argv[0])
    config, last = runs.files(run)
    # the checkpoint places the run where it is now, wherever it has been moved since its config was written
    return ["fit", "--config", str(config), "--ckpt_path", str(last), *argv[1:]]


def main(argv: list[str]) -> None:
    """``argv``: the command (fit, validate, test, predict or resume), then its arguments."""
    if argv[0] == "resume":
        expanded = _resume_args(argv[1:])
        if sys.argv[1:] == argv:  # DDP starts its other processes from sys.argv: they must see the same run
            sys.argv[1:] = expanded
        argv = expanded
    check_config_files(argv)
    check_unquoted_pattern(argv)
    failed = True
    try:
        with StopSignals():
            CLI(args=argv)
        failed = False
    except Exception as err:
        raise _said(err) from None
    finally:  # an evaluation that stopped before it wrote anything leaves no directory in the run
        runs.release(failed)


# the packages of the trackers Lightning's loggers write to: their errors are about the tracker's setup, not the run
TRACKERS = ("mlflow", "wandb", "neptune", "comet_ml")


def _said(err: Exception) -> Exception:
    """What an error raised while a command ran is for the user: one paragraph where it is theirs to fix."""
    if type(err).__module__.split(".")[0] in TRACKERS:
        what = " ".join(str(err).split()) or type(err).__name__
        return ConfigError(f"the logger's tracker ({type(err).__module__.split('.')[0]}) refused this run: {what}")
    if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err):  # weights that do not fit
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        return ConfigError(
            f"the checkpoint's weights do not fit the model as this command builds it ({first}): give the model its "
            "run was trained with (--config <run>/config.yaml), or train a new run with this one."
        )
    return err
