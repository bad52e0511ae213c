"""Leaf package shared by every stage: imports nothing from the project."""
from common.errors import ConfigError, QwenPretrainError

__all__ = ["ConfigError", "QwenPretrainError"]
