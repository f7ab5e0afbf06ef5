"""``python -m project COMMAND``: Lightning's subcommands, plus ``resume``. Only what a command needs is imported,
so ``--help`` answers without loading torch."""

import sys

HELP = """usage: python -m project COMMAND [options]

Train, compare and ship image classifiers (MNIST, Fashion-MNIST, CIFAR-10) with PyTorch Lightning.

commands:
  fit       train, validate each epoch, early-stop, keep the best checkpoint, then test it
  validate  evaluate a checkpoint on the validation split
  test      evaluate a checkpoint on the test set
  predict   write predictions.csv (one row per test image) into the run directory
  resume    continue an interrupted run: resume logs/<name>/version_<n> [--KEY VALUE ...]
  compare   run configs (or an experiment directory) and compare them: table + curves
  lr-plot   plot a config's learning-rate schedule without training
  search    hyperparameter search with Optuna; every trial a normal run, the study resumable

Each command takes --help, e.g.  python -m project fit --help
Train the default config:        python -m project fit --config configs/default.yaml
"""


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in (None, "-h", "--help"):
        print(HELP, end="")
        return
    if command == "compare":
        from project.compare import main as compare

        return compare(sys.argv[2:])
    if command == "lr-plot":
        from project.lr_plot import main as lr_plot

        return lr_plot(sys.argv[2:])
    if command == "search":
        from project.search import main as search

        return search(sys.argv[2:])
    from project.cli import main as cli

    cli()


main()
