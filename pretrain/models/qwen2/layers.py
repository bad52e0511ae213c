"""The two modules megatron-core's local spec lacks for Qwen2: an RMSNorm that works with sequence
parallelism, and a core attention on fused kernels (torch SDPA, or flash-attn where installed)."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """Qwen2's RMSNorm (normalise in fp32, cast back, scale).

    Under sequence parallelism each tensor-parallel rank sees a different slice of the sequence, so the
    weight gradient is partial: tagging the weight ``sequence_parallel`` makes megatron-core's
    ``finalize_model_grads`` all-reduce it over the tensor-parallel group. Without the tag the norm
    gradients are silently wrong (torch's RMSNorm in the local spec refuses sequence parallel instead).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight


_HAVE_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


class SDPAttention(MegatronModule):
    """Causal core attention over fused kernels, a drop-in for megatron-core's ``DotProductAttention``.

    Inputs are megatron's ``[seq, batch, heads, head_dim]`` (keys/values with the GQA group count);
    the output is ``[seq, batch, heads * head_dim]``. On CUDA with bf16 it uses ``flash_attn`` when the
    package is installed, otherwise torch SDPA, which dispatches to its FlashAttention/cuDNN kernels;
    on CPU torch SDPA runs its reference kernel.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **_unused,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention does not take packed sequences or an attention bias")
        dropout = self.dropout if self.training else 0.0
        if _HAVE_FLASH_ATTN and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
            from flash_attn import flash_attn_func

            # flash-attn wants [batch, seq, heads, dim] and handles GQA itself.
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))
            out = flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=self.softmax_scale, causal=True)
            out = out.transpose(0, 1)
        else:
            # SDPA wants [batch, heads, seq, dim].
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
            out = out.permute(2, 0, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], -1)
