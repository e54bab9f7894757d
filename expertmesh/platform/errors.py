"""Errors raised by the cluster-free core. Each names what is wrong so a person can fix it."""


class ExpertmeshError(Exception):
    """Base class for every error expertmesh raises on purpose."""


class ConfigError(ExpertmeshError, ValueError):
    """A configuration value is invalid. ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class CheckpointError(ExpertmeshError):
    """A checkpoint is missing, incomplete or corrupt. The message names the file."""


class DataError(ExpertmeshError):
    """Training data is missing or malformed."""
