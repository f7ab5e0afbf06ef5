"""Config files as the command line names them, read before LightningCLI parses them (no torch here: ``--help`` of a
command that only lists config names stays fast)."""

import itertools
from pathlib import Path

from project.errors import ConfigError

# the home of every default a run sets (the package is installed editable from the repository: pip install -e .)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def config_paths(config_args: list[str]) -> list[Path]:
    """The ``--config`` (``-c``) files among command-line arguments, in order."""
    following = [*config_args[1:], ""][: len(config_args)]
    return [Path(a.split("=", 1)[1] if "=" in a else b)
            for a, b in zip(config_args, following, strict=True) if a.split("=")[0] in ("--config", "-c")]  # fmt: skip


def config_stems(config_args: list[str]) -> list[str]:
    """The names (file stems) of the ``--config`` files among command-line arguments, in order."""
    return [p.stem for p in config_paths(config_args)]


def check_config_files(argv: list[str]) -> None:
    """jsonargparse 4.53 answers an empty config file with a blank "Unexpected config:" (its issue 367 fixed that for
    default config files only), one that is not YAML with a line number in "<unicode string>", and a section written
    as a list with every alternative of its type; say which file and what is wrong instead."""
    import yaml

    for path in config_paths(argv):
        if path.is_file():
            try:
                with open(path) as f:
                    loaded = yaml.safe_load(f)
                empty = loaded is None
            except UnicodeDecodeError:
                raise ConfigError(f"{path} is not a text file: a config is YAML.") from None
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                what = getattr(err, "problem", None) or " ".join(str(err).split())
                raise ConfigError(f"{path} is not valid YAML: {what}{where}.") from None
            if empty:
                raise ConfigError(f"{path} is empty: a config holds YAML keys such as trainer:, model: or data:.")
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path} holds a {type(loaded).__name__}: a config holds YAML keys such as trainer:, "
                                  "model: or data:.")  # fmt: skip
            for section in ("trainer", "model", "data", "checkpoint", "early_stopping", "predictions"):
                if isinstance(loaded.get(section), list):
                    raise ConfigError(f"{section}: in {path} is a list (its lines start with '- '): a section holds "
                                      "keys, indented below it without '- ' (as in configs/default.yaml).")  # fmt: skip


def check_unquoted_pattern(argv: list[str]) -> None:
    """An unquoted ``--data.predict_files photos/*.png`` reaches us as many file names; argparse would call all but the
    first "unrecognized arguments"."""
    for i, option in enumerate(argv):
        name, equals, value = option.partition("=")
        if name == "--data.predict_files":
            values, rest = ([value], argv[i + 1 :]) if equals else (argv[i + 1 : i + 2], argv[i + 2 :])
            values += itertools.takewhile(lambda a: not a.startswith("-"), rest)
            if len(values) > 1:
                shown = ", ".join(values[:3]) + (", ..." if len(values) > 3 else "")
                raise ConfigError(
                    f"data.predict_files takes one value, and {len(values)} came: the shell expanded a pattern into "
                    f"file names ({shown}). Quote the pattern ('photos/*.png'), which the template expands itself, or "
                    "give a list: '[a.png, b.png]'."
                )
