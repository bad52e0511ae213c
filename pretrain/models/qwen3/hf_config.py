"""Qwen3 / Qwen3-MoE configs between transformers (``Qwen3Config``, ``Qwen3MoeConfig``) and our ModelConfig.

Qwen3 is the shared decoder (``pretrain/models/decoder``) with four switches set (``pretrain/models/config.py``):
no QKV bias (``attention_bias=false``), RMSNorm over each query and key head (``q_norm``/``k_norm``), a head
width of its own (``head_dim``, 128 in every release), and for MoE no shared expert with renormalised top-k
weights (``norm_topk_prob``). The weights use Qwen2's key names plus ``self_attn.{q,k}_norm.weight``, so the
Qwen2 state-dict adapter serves both families. What every family shares is in ``pretrain/models/hf/configs.py``.
"""
from __future__ import annotations

import torch

from pretrain.models.config import ModelConfig
from pretrain.models.hf.checkpoint import ConversionError
from pretrain.models.hf.configs import refuse_unsupported, shared_fields_from_hf, shared_fields_to_hf

MODEL_TYPES = ("qwen3", "qwen3_moe")


def model_config_from_hf(hf_config, *, name: str | None = None) -> ModelConfig:
    """Our ModelConfig for a transformers Qwen3 / Qwen3-MoE config; refuses what it cannot represent."""
    model_type = hf_config.model_type
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"expected a Qwen3 or Qwen3-MoE config, got model_type={model_type!r}")
    refuse_unsupported(hf_config, "Qwen3")
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
    return ModelConfig(**shared_fields_from_hf(hf_config, name), family="qwen3", kv_channels=hf_config.head_dim,
                       qkv_bias=bool(getattr(hf_config, "attention_bias", False)), qk_norm=True, **moe)


def hf_config_from_model(model: ModelConfig, *, vocab_size: int | None = None, dtype: torch.dtype = torch.float32):
    """The transformers ``Qwen3Config`` / ``Qwen3MoeConfig`` of ``model`` (a ``family: qwen3`` config)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    if not model.qk_norm:
        raise ConversionError("model.qk_norm=false cannot be written as Qwen3 (its attention always has q/k norms)")
    if model.shared_expert_ffn_hidden_size is not None:
        raise ConversionError("model.shared_expert_ffn_hidden_size is set: Qwen3-MoE has no shared expert")
    common = dict(shared_fields_to_hf(model, vocab_size), attention_bias=model.qkv_bias)
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
