"""The project's own exceptions, so callers can catch them and tests can expect them."""


class QwenPretrainError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(QwenPretrainError, ValueError):
    """A configuration value is invalid; the message names the field (e.g. ``parallel.tp``)."""


class DataError(QwenPretrainError):
    """The input data cannot give what was asked (e.g. no record has text in the configured field); the
    message names the file or field. Entry points print it as one ``data error: ...`` line, exit status 2."""


class TrainingDivergedError(QwenPretrainError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class CheckpointError(QwenPretrainError):
    """A checkpoint cannot be written or read as asked (the message says which and why)."""


def check_choice(field: str, value, choices: tuple) -> None:
    """Raise ConfigError naming ``field`` unless ``value`` is one of ``choices``.

    (OmegaConf structured configs cannot type fields as ``Literal``, so choices are checked here.)
    """
    if value not in choices:
        raise ConfigError(f"{field} must be one of {', '.join(map(repr, choices))}; got {value!r}")
