"""Error types. Every user-facing mistake raises a subclass of `MuseUserError` with a message
that says what is wrong, why, and how to fix it; the CLI turns these into exit code 2."""


class MuseUserError(ValueError):
    """Bad input from a user (config, data, checkpoint, option). Subclasses ValueError so that
    library callers can catch it the usual way."""


class ConfigError(MuseUserError):
    """A config field has an invalid value."""


class DataError(MuseUserError):
    """Training or evaluation data is missing, empty or unreadable."""


class CheckpointError(MuseUserError):
    """A path is not a readable muse_lm checkpoint or run directory."""
