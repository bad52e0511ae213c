"""The project's own exceptions, so callers can catch them and tests can expect them."""


class QwenPretrainError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(QwenPretrainError, ValueError):
    """A configuration value is invalid; the message names the field (e.g. ``parallel.tp``)."""
