"""Parameter counts and training FLOPs per token of a Qwen decoder shape (any family) (for MFU and for checking presets).

FLOPs: 6 FLOPs per token per active matmul weight (forward 2, backward 4, output layer included, embedding
lookup excluded) plus attention scores and values. Two conventions for the attention term, reported side by
side because published MFU figures use either:

* PaLM / torchtitan / nanotron (``causal=False``, the default): 12 · layers · heads · head_dim · seq, every
  query-key pair counted (causal masking not discounted);
* Megatron-LM's ``num_floating_point_operations`` (``causal=True``): half of that, 6 · layers · heads ·
  head_dim · seq, since a causal kernel skips the masked half.
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.models.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    """Every parameter (each expert counted)."""
    active: int
    """Parameters one token passes through (top-k routed experts + shared expert)."""
    embedding: int
    """Input embedding (also the output layer when tied)."""


def _attention_params(m: ModelConfig) -> int:
    kv = m.num_kv_heads * m.head_dim
    q = m.num_heads * m.head_dim
    bias = (q + 2 * kv) if m.qkv_bias else 0
    qk_norm = 2 * m.head_dim if m.qk_norm else 0  # one RMSNorm weight each for q and k, shared by the heads
    return m.hidden_size * (q + 2 * kv) + bias + q * m.hidden_size + qk_norm  # qkv (+bias), out (+QK-norm)


def _swiglu(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn


def _mlp_params(m: ModelConfig, active: bool) -> int:
    if not m.is_moe:
        return _swiglu(m.hidden_size, m.ffn_hidden_size)
    experts = m.moe_topk if active else m.num_experts
    params = experts * _swiglu(m.hidden_size, m.moe_ffn_hidden_size) + m.hidden_size * m.num_experts  # + router
    if m.shared_expert_ffn_hidden_size:
        params += _swiglu(m.hidden_size, m.shared_expert_ffn_hidden_size) + m.hidden_size  # + sigmoid gate
    return params


def param_count(m: ModelConfig, vocab_size: int | None = None) -> ParamCount:
    vocab = vocab_size or m.vocab_size
    if vocab is None:
        raise ValueError("param_count needs a vocabulary size (model.vocab_size is null)")
    embedding = vocab * m.hidden_size
    output = 0 if m.tie_embeddings else embedding
    norms = 2 * m.hidden_size * m.num_layers + m.hidden_size

    def count(active: bool) -> int:
        return embedding + output + norms + m.num_layers * (_attention_params(m) + _mlp_params(m, active))

    return ParamCount(total=count(False), active=count(True), embedding=embedding)


def flops_per_token(m: ModelConfig, seq_len: int, vocab_size: int | None = None, *, causal: bool = False) -> float:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``; ``causal`` halves the
    attention term (Megatron-LM's convention), else every query-key pair counts (PaLM's)."""
    vocab = vocab_size or m.vocab_size
    per_layer = _attention_params(m) + _mlp_params(m, active=True) - m.hidden_size * (m.num_experts or 0)
    per_layer -= 2 * m.head_dim if m.qk_norm else 0  # norms are not matmuls
    matmul_params = m.num_layers * per_layer + vocab * m.hidden_size  # output layer always runs
    attention = (6 if causal else 12) * m.num_layers * m.num_heads * m.head_dim * seq_len
    return 6 * matmul_params + attention
