"""Model families: what each one declares once (torchtitan's ``ModelSpec``), picked by ``model.family``.

A family is a folder under ``pretrain/models/`` whose ``family.py`` builds one :class:`ModelFamily`.
Shared code (build, convert, preflight, the planner) asks this registry instead of naming a family. The
families share the decoder (``decoder/``: megatron spec, layers, FLOPs; its variants are switches of
``config.ModelConfig``) and the family-agnostic Hugging Face I/O and sharding (``hf/``); a family folder holds
its Hugging Face config mapping and, where its weight names differ, its state-dict adapter (Qwen3 reads and
writes Qwen2's names, so it points at Qwen2's adapter).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import ConfigError

# family name -> module that defines FAMILY; the one list to extend when a family is added
_MODULES = {"qwen2": "pretrain.models.qwen2.family", "qwen3": "pretrain.models.qwen3.family"}


@dataclass(frozen=True)
class ModelFamily:
    name: str
    hf_model_types: tuple[str, ...]
    """transformers ``model_type`` values this family reads and writes (dense, MoE)."""
    config_from_hf: Callable
    """``(hf_config, *, name=None) -> config``; raises ConversionError naming a field it cannot represent."""
    config_to_hf: Callable
    """``(config, *, vocab_size=None, dtype=...) -> transformers config``."""
    decoder: str
    """Module with ``transformer_config(config, *, layout, ...) -> TransformerConfig`` and
    ``build_model_chunks(config, TransformerConfig, vocab_size, ...) -> [GPTModel]`` (the megatron layer spec is
    inside). A module path, imported on first use: megatron-core stays out of the planner and config checks."""
    state_dict_adapter: str
    """Module with ``global_from_hf``, ``hf_from_global`` and ``hf_vocab_rows``: HF weight names <-> megatron
    global names (``hf.sharding`` does the layouts)."""
    param_count: Callable
    flops_per_token: Callable

    def adapter(self):
        return importlib.import_module(self.state_dict_adapter)

    def transformer_config(self, *args, **kwargs):
        return importlib.import_module(self.decoder).transformer_config(*args, **kwargs)

    def build_model_chunks(self, *args, **kwargs):
        return importlib.import_module(self.decoder).build_model_chunks(*args, **kwargs)


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def get(name: str) -> ModelFamily:
    if name not in _MODULES:
        raise ConfigError(f"model.family must be one of {', '.join(map(repr, _MODULES))}; got {name!r}")
    return importlib.import_module(_MODULES[name]).FAMILY


def family_of_hf(model_type: str | None) -> ModelFamily:
    """The family that reads a transformers config of ``model_type``."""
    from pretrain.models.hf.checkpoint import ConversionError

    for name in _MODULES:
        family = get(name)
        if model_type in family.hf_model_types:
            return family
    known = [t for n in _MODULES for t in get(n).hf_model_types]
    raise ConversionError(f"model_type={model_type!r} is not supported (known: {', '.join(known)})")
