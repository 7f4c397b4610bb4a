from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration error; its message names the field and the fix."""


class CorpusError(ValueError):
    """A user-facing corpus problem; the message names the domain or file and the fix."""


class DataError(ValueError):
    """A CSV file that cannot be used; the message names the file, where, and the fix."""


class TrackingUnavailable(RuntimeError):
    """MLflow did not answer after every retry."""
