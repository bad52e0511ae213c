"""FLOPs per token in the two MFU conventions, against Megatron-LM's and PaLM's formulas written out here."""
from __future__ import annotations

import pytest

from pretrain.models.config import ModelConfig
from pretrain.models.decoder.flops import flops_per_token

QWEN2_1_5B = ModelConfig(name="qwen2_1_5b", hidden_size=1536, ffn_hidden_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, vocab_size=151936, tie_embeddings=True)


def megatron_lm_flops_per_token(h: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, seq: int) -> float:
    """Megatron-LM ``num_floating_point_operations`` / (batch x seq) for a dense GQA SwiGLU model: 3 (fwd + 2 bwd)
    x 2 (FMA) x [per layer: QKV + causal core attention (q x seq / 2, twice) + output projection + 3 SwiGLU
    GEMMs; + logits]."""
    q = h
    kv = h // heads * kv_heads
    attention = h * (q + 2 * kv) + q * seq / 2 * 2 + q * h
    mlp = 3 * h * ffn
    return 3 * 2 * (layers * (attention + mlp) + h * vocab)


def test_causal_convention_is_megatron_lms():
    seq = 4096
    ref = megatron_lm_flops_per_token(1536, 8960, 28, 12, 2, 151936, seq)
    # ours also counts the q/k/v biases (6 x 28 x 2048 FLOPs, 3e-5 of the total); Megatron-LM leaves them out
    assert flops_per_token(QWEN2_1_5B, seq, causal=True) == pytest.approx(ref, rel=1e-4)


def test_palm_convention_counts_every_query_key_pair():
    seq = 4096
    full, causal = flops_per_token(QWEN2_1_5B, seq), flops_per_token(QWEN2_1_5B, seq, causal=True)
    assert full - causal == 6 * 28 * 12 * 128 * seq  # the masked half of 12 x layers x heads x head_dim x seq
    # 6N + 12 L h s with N the matmul weights (biases included): PaLM's appendix B
    n = 28 * (1536 * (1536 + 2 * 256) + (1536 + 2 * 256) + 1536 * 1536 + 3 * 1536 * 8960) + 151936 * 1536
    assert full == 6 * n + 12 * 28 * 1536 * seq
