"""``python -m project COMMAND`` (or the installed ``project`` script): the one entry point of every command.

Each command is a module with a ``main(argv)``, imported only when it runs, so that ``--help`` answers without
loading torch. Errors a user can fix (:class:`~project.errors.ProjectError`) end here, as one paragraph on stderr
and the error's exit code, whichever command raised them.
"""

import gc
import importlib
import signal
import sys

# command -> (its module in the package, what it does)
COMMANDS = {
    "fit": ("cli", "train, validate each epoch, early-stop, keep the best checkpoint, then test it"),
    "validate": ("cli", "evaluate a checkpoint on the validation split"),
    "test": ("cli", "evaluate a checkpoint on the test set"),
    "predict": ("cli", "a checkpoint's predictions.csv: the test set, or files (data.predict_files)"),
    "resume": ("cli", "continue an interrupted run: resume logs/<name>/version_<n> [--KEY VALUE ...]"),
    "compare": ("commands.compare", "train configs (or an experiment directory) side by side: table + curves"),
    "lr-plot": ("commands.lr_plot", "plot a config's learning-rate schedule without training"),
    "lr-find": (
        "commands.tune",
        "Lightning's learning-rate finder on a config: plot, and a config with the rate",
    ),
    "batch-size-find": (
        "commands.tune",
        "Lightning's batch-size finder on a config: a config with the batch size",
    ),
    "search": (
        "commands.search",
        "hyperparameter search with Optuna; every trial a normal run, the study resumable",
    ),
    "export": (
        "commands.export",
        "a run's best checkpoint to ONNX and torch.export (.pt2), checked against PyTorch",
    ),
    "serve": ("commands.serve", "a run's exported model over HTTP (LitServe): POST /predict, a web page at /"),
}

HELP = (
    "usage: python -m project COMMAND [options]\n\n"
    "Train, compare and ship image classifiers (MNIST, Fashion-MNIST, CIFAR-10, your folder of images)\n"
    "with PyTorch Lightning.\n"
    "With no --config, fit/validate/test/predict run configs/default.yaml; --config files and --KEY VALUE\n"
    "flags stack on top of it.\n\ncommands:\n"
    + "".join(f"  {name:<15} {text}\n" for name, (_, text) in COMMANDS.items())
    + "\nEach command takes --help, e.g.  python -m project fit --help\n"
    "Train the default config:        python -m project fit\n"
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(HELP, end="")
        return
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        sys.exit(2)
    from project.errors import ProjectError  # no torch: errors.py imports nothing
    from project.noise import quiet

    quiet()
    try:
        run = importlib.import_module(f"project.{COMMANDS[command][0]}").main
        # torch's, Lightning's and jsonargparse's objects live as long as the process: the collector's full passes
        # stop rescanning them (a short run takes a sixth less time)
        gc.freeze()
        run(argv)
    except ProjectError as err:
        if str(err):  # empty from the processes of a DDP run other than the first, which has said it
            print(f"{err.label}{err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except OSError as err:  # the environment: a directory that is read-only or a file, a full disk
        where = f" {err.filename}" if err.filename else ""
        hint = "logs go to trainer.logger.init_args.save_dir, data to data.data_dir"
        print(f"error: cannot use{where}: {err.strerror or err}. Check that the path is a writable directory with "
              f"free space ({hint}).", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    except KeyboardInterrupt:  # outside a fit, whose own handler saves a checkpoint first
        print(f"\nerror: {command} interrupted.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
