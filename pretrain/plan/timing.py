"""Predicted step time of a layout: compute, exposed TP/CP/EP communication, pipeline bubble, DP reduction.

Per microbatch and pipeline stage: matmuls at ``matmul_eff`` of the peak, causal flash attention at
``attention_eff``, memory-bound work (norms, RoPE, SwiGLU, residuals, cross-entropy) as bytes over
``memory_eff`` of HBM bandwidth. Recompute adds the forward it replays. Communication is ring-collective
volume over NVLink (group inside a node) or the network, at the link efficiency; it is exposed (this
trainer does not overlap tensor-, context- or expert-parallel collectives with compute), except the
data-parallel reduction with ``overlap_grad_reduce`` / FSDP-style prefetch, where only what exceeds
the compute it hides behind is exposed. The pipeline bubble of 1F1B is (pp - 1) microbatch-stage times,
divided by vpp when interleaved.
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.models.config import ModelConfig
from pretrain.plan.hardware import GPU
from pretrain.plan.memory import Layout, rank_params


@dataclass
class StepTime:
    compute: float
    tp_comm: float
    cp_comm: float
    ep_comm: float
    pp_bubble: float
    dp_comm: float

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.cp_comm + self.ep_comm + self.pp_bubble + self.dp_comm


def _bandwidth(gpu: GPU, group: int, span: int) -> float:
    """Bytes/s of a collective over ``group`` ranks spaced ``span`` apart (inside a node if it fits)."""
    inside = group * span <= gpu.gpus_per_node
    return (gpu.nvlink_gbps * gpu.nvlink_eff if inside else gpu.network_gbps * gpu.network_eff) * 1e9


def _ring(nbytes: float, group: int) -> float:
    return nbytes * (group - 1) / group if group > 1 else 0.0


def step_time(m: ModelConfig, vocab: int, lay: Layout, gpu: GPU, seq_len: int, num_microbatches: int, *,
              bf16: bool = True, fsdp_prefetch: bool = False) -> StepTime:
    e = 2 if bf16 else 4
    t, cp = lay.tp, lay.cp
    s = seq_len // cp
    tokens = s * lay.micro_batch_size  # per microbatch, per cp rank
    h, d, a, g = m.hidden_size, m.head_dim, m.num_heads, m.num_kv_heads
    layers = m.num_layers / lay.pp
    # Matmul FLOPs per token per layer (forward), on this rank.
    attn_w = h * (a + 2 * g) * d + a * d * h
    if m.is_moe:
        mlp_w = m.moe_topk * 3 * h * m.moe_ffn_hidden_size * t / lay.expert_tp + h * m.num_experts * t
        if m.shared_expert_ffn_hidden_size:
            mlp_w += 3 * h * m.shared_expert_ffn_hidden_size
    else:
        mlp_w = 3 * h * m.ffn_hidden_size
    matmul_fwd = 2 * tokens * (attn_w + mlp_w) / t
    # Causal attention scores + values: 4 · s_q · s_kv / 2 · a · d per sample (the kernels skip masked blocks).
    attn_fwd = 2 * lay.micro_batch_size * s * seq_len * a * d / t
    mem_fwd = tokens * e * (16 * h + 6 * (a + 2 * g) * d / t + 4 * m.ffn_hidden_size / t)
    peak = gpu.bf16_tflops * 1e12 * (1 if bf16 else 0.5)
    layer_fwd = (matmul_fwd / (peak * gpu.matmul_eff) + attn_fwd / (peak * gpu.attention_eff)
                 + mem_fwd / (gpu.hbm_tbps * 1e12 * gpu.memory_eff))
    replay = {"full": 1.0, "selective": 0.0}.get(lay.recompute, 0.0)
    if lay.recompute == "selective" and "core_attn" in lay.recompute_modules:
        replay_t = attn_fwd / (peak * gpu.attention_eff)
    else:
        replay_t = replay * layer_fwd
    stage_mb = layers * (3 * layer_fwd + replay_t)
    # Output layer + cross-entropy on the last stage (the slowest stage sets the pace).
    head = 3 * 2 * tokens * h * vocab / t / (peak * gpu.matmul_eff) + tokens * vocab / t * 24 / (
        gpu.hbm_tbps * 1e12 * gpu.memory_eff)
    stage_mb += head
    compute = num_microbatches * stage_mb
    # TP: with or without SP, 4 collectives of s·b·h per layer forward, 4 backward (+2 re-gathers under SP).
    act = tokens * h * e
    tp_bw = _bandwidth(gpu, t, 1)
    tp_layer = (10 if lay.sequence_parallel else 8) * _ring(act, t) / tp_bw if t > 1 else 0.0
    tp_comm = num_microbatches * layers * tp_layer * (1 + replay)
    # CP: all-gather K/V forward, reduce-scatter their gradients backward (full sequence, kv heads / tp).
    cp_comm = 0.0
    if cp > 1:
        kv = lay.micro_batch_size * seq_len * 2 * g * d / t * e
        cp_comm = num_microbatches * layers * 2 * _ring(kv, cp) / _bandwidth(gpu, cp, t) * (1 + replay)
    # EP: all-to-all dispatch + combine, forward and backward, top-k copies of each token.
    ep_comm = 0.0
    if m.is_moe and lay.ep > 1:
        routed = tokens / (t if lay.sequence_parallel else 1) * m.moe_topk * h * e
        ep_comm = num_microbatches * layers * 4 * _ring(routed, lay.ep) / _bandwidth(gpu, lay.ep, t * cp) * (1 + replay)
    # Pipeline bubble: (pp - 1) / vpp microbatch-stage times, plus the p2p hand-offs.
    bubble = 0.0
    if lay.pp > 1:
        p2p = 2 * act / (t if lay.sequence_parallel else 1) / _bandwidth(gpu, 2, t * cp * lay.dp)
        bubble = (lay.pp - 1) / lay.vpp * (stage_mb + tp_layer * layers) + 2 * num_microbatches * lay.vpp * p2p
    # DP: fp32 gradient reduce-scatter (ZeRO-1) or all-reduce (ZeRO-0), bf16 parameter all-gather (ZeRO-1);
    # ZeRO-3 gathers parameters twice per microbatch and reduce-scatters gradients per microbatch.
    params = sum(p.numel for chunk in rank_params(m, vocab, lay) for p in chunk)
    dpg = lay.dp * cp
    dp_bw = _bandwidth(gpu, dpg, t * lay.pp) if dpg > 1 else 1.0
    if lay.zero == 3:
        volume = num_microbatches * (2 * _ring(params * e, dpg) + _ring(params * 4, dpg))
    elif lay.zero == 2:
        volume = num_microbatches * _ring(params * 4, dpg) + _ring(params * e, dpg)
    elif lay.zero == 1:
        volume = _ring(params * 4, dpg) + _ring(params * e, dpg)
    else:
        volume = 2 * _ring(params * 4, dpg)
    dp_comm = volume / dp_bw if dpg > 1 else 0.0
    if fsdp_prefetch or lay.overlap_grad_reduce:
        hidden_behind = compute if fsdp_prefetch else stage_mb * 2 / 3
        dp_comm = max(0.0, dp_comm - hidden_behind)
    return StepTime(compute=compute, tp_comm=tp_comm, cp_comm=cp_comm, ep_comm=ep_comm, pp_bubble=bubble,
                    dp_comm=dp_comm)
