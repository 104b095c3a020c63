"""Errors that every stage turns into exit code 1 with their message (no traceback)."""


class UserError(Exception):
    """Bad input or a run that cannot continue: the message names the cause and the fix."""


class ConfigError(UserError, ValueError):
    """A config that cannot run: the message names the key, the value and the fix."""


class DataError(UserError, ValueError):
    """Missing, empty or malformed data."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not exist or does not match the model."""


class StateLayoutError(CheckpointError):
    """No step of a run could be resumed, each for a train state laid out otherwise than
    the run's (another optimizer, or an earlier pretrax's optimizer state)."""
