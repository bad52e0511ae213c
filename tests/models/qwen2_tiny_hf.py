"""Tiny random Qwen2 / Qwen2-MoE / Qwen3 / Qwen3-MoE Hugging Face models, built locally (never downloaded)."""
from __future__ import annotations

import math

import torch

VOCAB = 256
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6, attention_dropout=0.0)
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                norm_topk_prob=False, router_aux_loss_coef=0.01)

# Qwen3: head_dim 32 != hidden / heads (16), so an independent head width is exercised; no QKV bias, QK-norm.
TINY_QWEN3 = dict(head_dim=32, attention_bias=False)
TINY_QWEN3_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      router_aux_loss_coef=0.01)


def tiny_hf_config(kind: str, *, vocab_size: int = VOCAB, tied: bool = False):
    """``kind``: 'dense' / 'moe' (Qwen2, Qwen2-MoE), 'qwen3' / 'qwen3_moe'."""
    from transformers import Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(TINY, vocab_size=vocab_size, tie_word_embeddings=tied)
    if kind == "qwen3":
        return Qwen3Config(**common, **TINY_QWEN3)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**common, **TINY_QWEN3, **TINY_QWEN3_MOE)
    return Qwen2MoeConfig(**common, **TINY_MOE) if kind == "moe" else Qwen2Config(**common)


def build_tiny_hf(kind: str, *, seed: int = 0, vocab_size: int = VOCAB, tied: bool = False):
    """A random tiny model whose activations are O(1): unit-variance fan-in init, norm weights 1 ± 0.1,
    random biases and router -- so a swapped or mis-sliced tensor changes the logits visibly and no
    two experts tie in the router."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(kind, vocab_size=vocab_size, tied=tied)
    config._attn_implementation = "eager"  # reference attention independent of megatron's SDPA path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model.eval()
