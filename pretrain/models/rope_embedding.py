"""The rotary table of a megatron-core GPTModel with YaRN / dynamic-NTK inverse frequencies (pretrain/models/
rope_scaling.py has the why and the maths)."""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from pretrain.models.rope_scaling import RopeScalingConfig, dynamic_ntk_inv_freq, yarn_inv_freq


class ScaledRotaryEmbedding(RotaryEmbedding):
    """megatron-core's RotaryEmbedding with YaRN or dynamic-NTK inverse frequencies (fp32). Its forward (cached
    per length, sliced per context-parallel rank by the parent) is unchanged."""

    def __init__(self, *, dim: int, base: float, scaling: RopeScalingConfig, cp_group=None) -> None:
        super().__init__(kv_channels=dim, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True,
                         cp_group=cp_group)
        self.dim, self.base, self.scaling = dim, base, scaling
        if scaling.type == "yarn":
            self.inv_freq = yarn_inv_freq(dim, base, scaling)

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        if self.scaling.type == "dynamic":  # the table depends on the length seen (megatron passes the full one)
            self.inv_freq = dynamic_ntk_inv_freq(self.dim, self.base, self.scaling, max_seq_len + offset).to(
                self.inv_freq.device)
        return super().get_freqs_non_repeated(max_seq_len, offset)


def install(chunk: torch.nn.Module, *, dim: int, base: float, scaling: RopeScalingConfig) -> None:
    """Swap a freshly built GPTModel chunk's rotary table for the scaled one (no-op for type=none)."""
    if scaling.type == "none" or getattr(chunk, "rotary_pos_emb", None) is None:
        return
    old = chunk.rotary_pos_emb
    new = ScaledRotaryEmbedding(dim=dim, base=base, scaling=scaling, cp_group=old.cp_group)
    new.inv_freq = new.inv_freq.to(old.inv_freq.device)
    chunk.rotary_pos_emb = new
    if scaling.type == "yarn":
        # Read by megatron's SelfAttention (see the module docstring); mscale None -> 0.1 ln(factor) + 1.
        chunk.config.yarn_rotary_scaling_factor = float(scaling.factor)
        chunk.config.yarn_mscale = None
        chunk.config.yarn_mscale_all_dim = None
