"""Errors raised by the cluster-free core. Each names what is wrong so a person can fix it."""


class ExpertmeshError(Exception):
    """Base class for every error expertmesh raises on purpose."""


class ConfigError(ExpertmeshError, ValueError):
    """A configuration value is invalid. ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # NOTE: the default pickling replays ``args`` (one string) into a two-argument
        # ``__init__`` and fails, so Ray could not carry this error back from an actor.
        return (type(self), (self.field, self.reason))


class CheckpointError(ExpertmeshError):
    """A checkpoint is missing, incomplete or corrupt. The message names the file."""


class DataError(ExpertmeshError):
    """Training data is missing or malformed."""
