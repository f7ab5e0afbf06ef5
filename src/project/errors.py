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
