"""Errors a user can fix. The CLI prints their message as one paragraph, without a traceback."""


class ProjectError(Exception):
    exit_code = 1
    label = "error: "  # what the message starts with


class ConfigError(ProjectError):
    """A setting that cannot work (exit code 2, like jsonargparse's own parse errors)."""

    exit_code = 2


class DataError(ProjectError):
    """Dataset files that are missing, truncated, corrupt or malformed."""


class NonFiniteError(ProjectError):
    """Training produced a NaN or infinite loss or metric."""


class ExportError(ProjectError):
    """A model that cannot be exported, or whose export does not compute what PyTorch computes."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error that says something (exporters and runtimes write pages), or its type."""
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
