"""Errors of the training pipeline that a user can cause, importable without torch (the command-line
entry points report them as one line before anything heavy is loaded)."""


class CheckpointError(ValueError):
    """A file that is not a whole checkpoint of this format (truncated, another format, not one at
    all); the message names it."""


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names the key."""
