"""Qwen2 / Qwen2.5 / Qwen2-MoE configs between transformers (``Qwen2Config``, ``Qwen2MoeConfig``) and ModelConfig.

What is not Qwen2's own (shape, RoPE, norms, the refusals every family shares) is in
``pretrain/models/hf/configs.py``.
"""
from __future__ import annotations

import torch

from pretrain.models.config import ModelConfig
from pretrain.models.hf.checkpoint import ConversionError
from pretrain.models.hf.configs import refuse_unsupported, shared_fields_from_hf, shared_fields_to_hf

MODEL_TYPES = ("qwen2", "qwen2_moe")


def model_config_from_hf(hf_config, *, name: str | None = None) -> ModelConfig:
    """Our ModelConfig for a transformers ``Qwen2Config`` / ``Qwen2MoeConfig``."""
    model_type = hf_config.model_type
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"expected a Qwen2 or Qwen2-MoE config, got model_type={model_type!r}")
    refuse_unsupported(hf_config, "Qwen2")
    head_dim = getattr(hf_config, "head_dim", None)
    kv_channels = None if head_dim in (None, hf_config.hidden_size // hf_config.num_attention_heads) else head_dim
    moe = {}
    if model_type == "qwen2_moe":
        if not getattr(hf_config, "qkv_bias", True):
            raise ConversionError("qkv_bias=false is not supported (Qwen2 attention has q/k/v biases)")
        if hf_config.decoder_sparse_step != 1 or list(hf_config.mlp_only_layers or []):
            raise ConversionError(
                "dense layers inside a Qwen2-MoE model (decoder_sparse_step != 1 or mlp_only_layers) are not "
                "supported: every layer of our MoE model is a MoE layer")
        if not hf_config.shared_expert_intermediate_size:
            raise ConversionError("Qwen2-MoE without a shared expert is not supported by HF's Qwen2MoeSparseMoeBlock")
        moe = dict(
            num_experts=hf_config.num_experts,
            moe_topk=hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            shared_expert_ffn_hidden_size=hf_config.shared_expert_intermediate_size,
            moe_norm_topk=bool(hf_config.norm_topk_prob),
            moe_aux_loss_coeff=float(hf_config.router_aux_loss_coef),
        )
    return ModelConfig(**shared_fields_from_hf(hf_config, name), kv_channels=kv_channels, **moe)


def hf_config_from_model(model: ModelConfig, *, vocab_size: int | None = None, dtype: torch.dtype = torch.float32):
    """The transformers config (``Qwen2Config`` or ``Qwen2MoeConfig``) of a ``family: qwen2`` model."""
    from transformers import Qwen2Config, Qwen2MoeConfig

    if model.qk_norm:
        raise ConversionError("model.qk_norm=true cannot be written as Qwen2 (no q/k norms): use model.family=qwen3")
    if not model.qkv_bias:
        raise ConversionError("model.qkv_bias=false cannot be written as Qwen2 (its q/k/v projections have biases)")
    common = shared_fields_to_hf(model, vocab_size)
    if not model.is_moe:
        config = Qwen2Config(**common)
        config.architectures = ["Qwen2ForCausalLM"]
    else:
        if model.shared_expert_ffn_hidden_size is None:
            raise ConversionError(
                "model.shared_expert_ffn_hidden_size is null: HF Qwen2-MoE always has a gated shared expert")
        config = Qwen2MoeConfig(
            **common,
            num_experts=model.num_experts,
            num_experts_per_tok=model.moe_topk,
            moe_intermediate_size=model.moe_ffn_hidden_size,
            shared_expert_intermediate_size=model.shared_expert_ffn_hidden_size,
            norm_topk_prob=model.moe_norm_topk,
            router_aux_loss_coef=model.moe_aux_loss_coeff,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
        )
        config.architectures = ["Qwen2MoeForCausalLM"]
    config.dtype = dtype  # written to config.json as the weights' dtype
    return config
