"""Leaf package shared by every stage: imports nothing from the project."""
from common.errors import ConfigError, QwenPretrainError, check_choice

__all__ = ["ConfigError", "QwenPretrainError", "check_choice"]
