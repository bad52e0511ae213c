"""The two modules megatron-core's local spec lacks for the Qwen decoder: an RMSNorm that works with sequence
parallelism, and a core attention on fused kernels (torch SDPA, or flash-attn where installed) that also
does context parallelism (megatron-core's own needs TransformerEngine)."""
from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
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
# torch 2.13 renames the tensor collectives (the old names warn); the GPU image's torch 2.11 has only the old.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over ``group``; backward sums every rank's gradient for this rank's slice
    (reduce-scatter), because every rank's queries attended to the keys/values gathered from here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
        _all_gather(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        _reduce_scatter(out, grad, group=ctx.group)
        return out, None


def _attend(q, k, v, *, dropout: float, scale: float | None) -> torch.Tensor:
    """Causal attention of q [batch, heads, q_len, dim] over k/v [batch, kv_heads, kv_len, dim] (GQA when
    fewer kv heads) with the queries at the last q_len key positions (lower-right aligned causal mask)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    kwargs = dict(dropout_p=dropout, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    if q.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        # SDPA dispatches a CausalBias to a flash / memory-efficient kernel with lower-right alignment.
        mask = causal_lower_right(q_len, kv_len)
    else:  # query i sits at key position kv_len - q_len + i and sees keys up to it
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(diagonal=kv_len - q_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cp_group,
                               dropout: float = 0.0, scale: float | None = None,
                               use_flash_attn: bool = False) -> torch.Tensor:
    """Causal attention of this context-parallel rank's queries over the whole sequence ("all-gather KV").

    Megatron-core's layout: the sequence is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks
    ``r`` and ``2cp-1-r`` (so every rank has the same causal work), concatenated; ``q``/``k``/``v`` are
    ``[seq/cp, batch, heads, dim]`` (``k``/``v`` with the GQA group count). Keys and values are all-gathered
    over ``cp_group`` (one collective for both), put back in sequence order, and each local query chunk
    attends to the keys up to its own end with lower-right causal alignment; the gradient of the gathered
    keys/values is reduce-scattered back to the rank that owns them. Returns ``[seq/cp, batch, heads, dim]``.

    Memory/communication trade-off (vs ring attention): every rank holds the full sequence's keys and
    values for one layer at a time (2 × seq × kv_heads × dim per sample, kept for backward), while queries,
    outputs and every other activation stay at seq/cp. With GQA (Qwen2-7B: 4 kv heads for 28 query heads)
    that is 2/7 of one full-length query tensor, so cheap next to the seq/cp saving elsewhere. The
    all-gather and reduce-scatter move (cp-1)/cp of it per layer and are not overlapped with compute;
    ring attention keeps only 1/cp of K/V and overlaps cp-1 point-to-point steps, at more complexity.
    This is the scheme Llama 3 used for long-context training.
    """
    cp = dist.get_world_size(cp_group)
    rank = dist.get_rank(cp_group)
    chunk = q.shape[0] // 2
    heads_k = k.shape[2]
    kv = _AllGatherSeq.apply(torch.cat([k, v], dim=2), cp_group)  # [cp * 2 * chunk, b, 2 * kv_heads, d]
    # Rank j sent chunks (j, 2cp-1-j): the first halves in rank order, then the second halves reversed.
    kv = kv.view(cp, 2, chunk, *kv.shape[1:])
    kv = torch.cat([kv[:, 0].flatten(0, 1), kv[:, 1].flip(0).flatten(0, 1)])  # [seq, b, 2 * kv_heads, d]
    outs = []
    for half, index in enumerate((rank, 2 * cp - 1 - rank)):
        end = (index + 1) * chunk  # this chunk's queries see keys [0, end)
        q_c = q[half * chunk : (half + 1) * chunk]
        k_c, v_c = kv[:end, :, :heads_k], kv[:end, :, heads_k:]
        if use_flash_attn:
            from flash_attn import flash_attn_func

            # [batch, seq, heads, dim]; flash-attn aligns causal masks lower-right when q_len < kv_len.
            out = flash_attn_func(*(t.transpose(0, 1) for t in (q_c, k_c, v_c)), dropout_p=dropout,
                                  softmax_scale=scale, causal=True).transpose(0, 1)
        else:
            out = _attend(*(t.permute(1, 2, 0, 3) for t in (q_c, k_c, v_c)), dropout=dropout,
                          scale=scale).permute(2, 0, 1, 3)
        outs.append(out)
    return torch.cat(outs)


class SDPAttention(MegatronModule):
    """Causal core attention over fused kernels, a drop-in for megatron-core's ``DotProductAttention``.

    Inputs are megatron's ``[seq, batch, heads, head_dim]`` (keys/values with the GQA group count);
    the output is ``[seq, batch, heads * head_dim]``. On CUDA with bf16 it uses ``flash_attn`` when the
    package is installed, otherwise torch SDPA, which dispatches to its FlashAttention/cuDNN kernels;
    on CPU torch SDPA runs its reference kernel. With context parallelism (cp > 1) it runs
    :func:`context_parallel_attention` over the context-parallel group; the single-rank path is unchanged.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        pg_collection=None,
        **_unused,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.cp = config.context_parallel_size
        self.cp_group = None
        if self.cp > 1:  # the group SelfAttention hands down, else megatron-core's global one
            self.cp_group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention does not take packed sequences or an attention bias")
        dropout = self.dropout if self.training else 0.0
        flash = _HAVE_FLASH_ATTN and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
        if self.cp > 1:
            out = context_parallel_attention(query, key, value, cp_group=self.cp_group, dropout=dropout,
                                             scale=self.softmax_scale, use_flash_attn=flash)
        elif flash:
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
