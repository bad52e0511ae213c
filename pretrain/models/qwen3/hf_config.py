"""Qwen3 / Qwen3-MoE configs between transformers (``Qwen3Config``, ``Qwen3MoeConfig``) and our ModelConfig.

Qwen3 is the Qwen2 decoder with four switches set (see ``pretrain/models/qwen2/config.py``): no QKV bias
(``attention_bias=false``), RMSNorm over each query and key head (``q_norm``/``k_norm``), a head width of its
own (``head_dim``, 128 in every release), and for MoE no shared expert with renormalised top-k weights
(``norm_topk_prob``). The weights use Qwen2's key names plus ``self_attn.{q,k}_norm.weight``, so the Qwen2
state-dict adapter serves both families.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain.models import rope_scaling
from pretrain.models.qwen2 import hf_adapter
from pretrain.models.qwen2.config import ModelConfig
from pretrain.models.qwen2.hf_adapter import ConversionError

MODEL_TYPES = ("qwen3", "qwen3_moe")


def model_config_from_hf(hf_config, *, name: str | None = None) -> ModelConfig:
    """Our ModelConfig for a transformers Qwen3 / Qwen3-MoE config; refuses what it cannot represent."""
    model_type = hf_config.model_type
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"expected a Qwen3 or Qwen3-MoE config, got model_type={model_type!r}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf_config.hidden_act!r} is not supported (Qwen3 uses silu)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ConversionError("use_sliding_window=true is not supported (full causal attention only)")
    if any(t != "full_attention" for t in getattr(hf_config, "layer_types", None) or []):
        raise ConversionError("layer_types other than full_attention are not supported (no sliding-window layers)")
    if getattr(hf_config, "attention_dropout", 0.0):
        raise ConversionError("attention_dropout > 0 is not supported (megatron model trains without dropout)")
    moe = {}
    if model_type == "qwen3_moe":
        if hf_config.decoder_sparse_step != 1 or list(hf_config.mlp_only_layers or []):
            raise ConversionError(
                "decoder_sparse_step != 1 / mlp_only_layers (dense layers inside a Qwen3-MoE model) are not "
                "supported: every layer of our MoE model is a MoE layer")
        moe = dict(
            num_experts=hf_config.num_experts,
            moe_topk=hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            moe_norm_topk=bool(hf_config.norm_topk_prob),
            moe_aux_loss_coeff=float(hf_config.router_aux_loss_coef),
        )
    if name is None:
        source = getattr(hf_config, "_name_or_path", "") or ""
        name = Path(source).name if source else f"{model_type}_hf"
    return ModelConfig(
        name=name,
        family="qwen3",
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        kv_channels=hf_config.head_dim,
        qkv_bias=bool(getattr(hf_config, "attention_bias", False)),
        qk_norm=True,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings,
        **_rope_from_hf(hf_config),
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
        **moe,
    )


def hf_config_from_model(model: ModelConfig, *, vocab_size: int | None = None, dtype: torch.dtype = torch.float32):
    """The transformers ``Qwen3Config`` / ``Qwen3MoeConfig`` of ``model`` (a ``family: qwen3`` config)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    if not model.qk_norm:
        raise ConversionError("model.qk_norm=false cannot be written as Qwen3 (its attention always has q/k norms)")
    if model.shared_expert_ffn_hidden_size is not None:
        raise ConversionError("model.shared_expert_ffn_hidden_size is set: Qwen3-MoE has no shared expert")
    vocab = vocab_size if vocab_size is not None else model.vocab_size
    if vocab is None:
        raise ConversionError("model.vocab_size is null: pass vocab_size (the embedding's row count)")
    common = dict(
        vocab_size=vocab, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads, head_dim=model.head_dim, attention_bias=model.qkv_bias,
        **_rope_to_hf(model), rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings, initializer_range=model.init_std, hidden_act="silu",
        attention_dropout=0.0, use_sliding_window=False,
    )
    if not model.is_moe:
        config = Qwen3Config(**common)
        config.architectures = ["Qwen3ForCausalLM"]
    else:
        config = Qwen3MoeConfig(
            **common, num_experts=model.num_experts, num_experts_per_tok=model.moe_topk,
            moe_intermediate_size=model.moe_ffn_hidden_size, norm_topk_prob=model.moe_norm_topk,
            router_aux_loss_coef=model.moe_aux_loss_coeff, decoder_sparse_step=1, mlp_only_layers=[])
        config.architectures = ["Qwen3MoeForCausalLM"]
    config.dtype = dtype
    return config


def _rope_from_hf(hf_config) -> dict:
    theta, scaling = hf_adapter._rope(hf_config)  # the Qwen2 adapter's reading: base and YaRN/dynamic scaling
    return dict(rope_base=theta, rope_scaling=scaling)


def _rope_to_hf(model: ModelConfig) -> dict:
    return dict(rope_theta=float(model.rope_base), rope_scaling=rope_scaling.to_hf(model.rope_scaling),
                max_position_embeddings=rope_scaling.hf_max_position_embeddings(model.rope_scaling, model.max_seq_len))
