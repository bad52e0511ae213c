"""transformers configs <-> our ModelConfig: what every family reads and writes alike (shape, RoPE, norms,
refusals), and the dispatch to the family that owns a ``model_type``. Each family's ``hf_config.py`` adds only
its own fields and classes."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from pretrain.models import rope_scaling
from pretrain.models.config import ModelConfig
from pretrain.models.hf.checkpoint import ConversionError


def model_config_from_hf(hf_config, *, name: str | None = None) -> ModelConfig:
    """Our ModelConfig for a transformers config (or a config.json dict) of any registered family; raises
    ConversionError naming a field the family cannot represent."""
    from pretrain.models import registry

    if isinstance(hf_config, Mapping):
        from transformers import AutoConfig

        hf_config = AutoConfig.for_model(**dict(hf_config))
    return registry.family_of_hf(getattr(hf_config, "model_type", None)).config_from_hf(hf_config, name=name)


def hf_config_from_model(model: ModelConfig, *, vocab_size: int | None = None, dtype: torch.dtype = torch.float32):
    """The transformers config of ``model`` in its family's classes. ``vocab_size`` overrides
    ``model.vocab_size`` (required when the latter is None, i.e. tokenizer-derived)."""
    from pretrain.models import registry

    return registry.get(model.family).config_to_hf(model, vocab_size=vocab_size, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Shared parts, for the families' hf_config.py
# --------------------------------------------------------------------------------------------------
def rope_from_hf(hf_config) -> tuple[float, rope_scaling.RopeScalingConfig]:
    """RoPE base and scaling of a transformers 4.x (``rope_theta``/``rope_scaling``) or 5.x (``rope_parameters``)
    config."""
    params = getattr(hf_config, "rope_parameters", None)
    scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(params, dict) and "rope_theta" in params:
        kind, theta = params.get("rope_type", "default"), params["rope_theta"]
    else:
        params = scaling or {}
        kind = params.get("rope_type", params.get("type", "default"))
        theta = hf_config.rope_theta
    try:
        return float(theta), rope_scaling.from_hf(kind, params, hf_config.max_position_embeddings)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


def refuse_unsupported(hf_config, family: str) -> None:
    """What no family here represents: another activation, sliding-window layers, attention dropout."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf_config.hidden_act!r} is not supported ({family} uses silu)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ConversionError("use_sliding_window=true is not supported (full causal attention only)")
    if any(t != "full_attention" for t in getattr(hf_config, "layer_types", None) or []):
        raise ConversionError("layer_types other than full_attention are not supported (no sliding-window layers)")
    if getattr(hf_config, "attention_dropout", 0.0):
        raise ConversionError("attention_dropout > 0 is not supported (megatron model trains without dropout)")


def shared_fields_from_hf(hf_config, name: str | None) -> dict:
    """ModelConfig fields every family reads the same way."""
    if name is None:
        source = getattr(hf_config, "_name_or_path", "") or ""
        name = Path(source).name if source else f"{hf_config.model_type}_hf"
    rope_base, scaling = rope_from_hf(hf_config)
    return dict(
        name=name,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_base=rope_base,
        rope_scaling=scaling,
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
    )


def shared_fields_to_hf(model: ModelConfig, vocab_size: int | None) -> dict:
    """transformers config arguments every family writes the same way."""
    vocab = vocab_size if vocab_size is not None else model.vocab_size
    if vocab is None:
        raise ConversionError("model.vocab_size is null: pass vocab_size (the embedding's row count)")
    return dict(
        vocab_size=vocab,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        max_position_embeddings=rope_scaling.hf_max_position_embeddings(model.rope_scaling, model.max_seq_len),
        rope_theta=float(model.rope_base),
        rope_scaling=rope_scaling.to_hf(model.rope_scaling),
        rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings,
        initializer_range=model.init_std,
        hidden_act="silu",
        attention_dropout=0.0,
        use_sliding_window=False,
    )
