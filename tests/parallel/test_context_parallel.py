"""Context-parallel attention (``pretrain.models.decoder.layers.context_parallel_attention``) against one
full-sequence causal SDPA: outputs and the gradients of q, k and v, at cp=2 and cp=4, with GQA.

One 4-rank job runs both degrees: cp=4 over the whole world, and cp=2 over the subgroups {0, 1} and
{2, 3} (so ranks 2 and 3 use their rank inside the group, not the global one). Each rank holds
megatron-core's layout: chunks r and 2cp-1-r of 2 × cp. The end-to-end training parity of cp layouts
is in test_layouts.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.testing import run_distributed
from pretrain.models.decoder.layers import context_parallel_attention  # imported once: forked ranks inherit it

SEQ, BATCH, HEADS, KV_HEADS, DIM = 32, 2, 4, 2, 8


def _local(t: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """This rank's part of a [seq, ...] tensor: chunks rank and 2cp-1-rank of 2cp."""
    chunks = t.chunk(2 * cp)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def _compare(group, cp: int) -> dict:
    g = torch.Generator().manual_seed(7)  # the same full tensors on every rank
    q = torch.randn(SEQ, BATCH, HEADS, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(SEQ, BATCH, KV_HEADS, DIM, generator=g, dtype=torch.float64)
    v = torch.randn(SEQ, BATCH, KV_HEADS, DIM, generator=g, dtype=torch.float64)
    grad_out = torch.randn(SEQ, BATCH, HEADS, DIM, generator=g, dtype=torch.float64)

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in full), is_causal=True,
                                         enable_gqa=True).permute(2, 0, 1, 3)
    ref.backward(grad_out)

    rank = dist.get_rank(group)
    local = [_local(t, cp, rank).clone().requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(*local, cp_group=group)
    out.backward(_local(grad_out, cp, rank))

    diffs = {"out": float((out - _local(ref, cp, rank)).abs().max())}
    for name, mine, theirs in zip("qkv", local, full):
        diffs[f"grad_{name}"] = float((mine.grad - _local(theirs.grad, cp, rank)).abs().max())
    diffs["out_scale"] = float(ref.abs().max())
    return diffs


def run_cp_attention(rank: int, world_size: int) -> dict:
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    return {4: _compare(dist.group.WORLD, 4), 2: _compare(pairs[rank // 2], 2)}


def test_context_parallel_attention_matches_full_sequence():
    results = run_distributed(run_cp_attention, 4, timeout=120)
    for rank, per_cp in enumerate(results):
        for cp, diffs in per_cp.items():
            assert diffs["out_scale"] > 0.1  # not a trivially zero output
            for name in ("out", "grad_q", "grad_k", "grad_v"):
                # float64: the only difference is the order of the sums (masked keys are dropped, not zeroed)
                assert diffs[name] < 1e-12, (rank, cp, name, diffs)
