"""Per-GPU memory of a layout: model states (exact, from the parameter list the trainer builds) and activations.

Model states follow what ``pretrain.build.build_train_module`` allocates, byte for byte where it can be
derived: each rank's parameters in megatron-core's registration order, its DDP buffers (one per dtype and
per dense / expert group; under the distributed optimizer every parameter starts on a 64-element boundary
and each bucket ends on a multiple of lcm(dp, 128) elements, a tied embedding gets a bucket of its own),
fp32 gradients (``grad_reduce_in_fp32``), fp32 master weights (bf16 only: megatron's fp32 shards of an fp32
model are views), and AdamW's two fp32 moments over the rank's shard. DeepSpeed ZeRO-2/3 (dp-only layouts)
follows DeepSpeed 0.19.8's flat partitions.

Activations are the bytes autograd saves for backward, per transformer layer and microbatch, term by term
as measured on CPU (``pretrain.plan.measure.SavedTensorMeter``; docs/planner.md lists the terms).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.layout import expert_tensor_parallel
from pretrain.models.config import ModelConfig

GiB = 2**30


@dataclass(frozen=True)
class Layout:
    """One candidate layout (the planner's unit); mirrors ``parallel.config.ParallelConfig`` + step knobs."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    dp: int = 1
    sequence_parallel: bool = False
    zero: int = 1
    micro_batch_size: int = 1
    recompute: str = "none"
    recompute_modules: tuple[str, ...] = ("core_attn",)
    recompute_num_layers: int = 1
    overlap_grad_reduce: bool = False

    @property
    def expert_tp(self) -> int:
        return expert_tensor_parallel(self.tp, self.etp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel degree of the expert parameters: megatron folds ep × etp into tp × cp × dp."""
        return self.tp * self.cp * self.dp // (self.ep * self.expert_tp)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        parts = [f"tp{self.tp}{'+sp' if self.sequence_parallel else ''}", f"pp{self.pp}"]
        parts += [f"vpp{self.vpp}"] if self.vpp > 1 else []
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += [f"dp{self.dp}", f"zero{self.zero}", f"mbs{self.micro_batch_size}", f"rc:{self.recompute}"]
        return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# Parameters of one rank, in megatron-core's registration order
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    numel: int
    expert: bool = False
    shared_embedding: bool = False


def _layer_params(m: ModelConfig, tp: int, ep: int, etp: int) -> list[Param]:
    h, d = m.hidden_size, m.head_dim
    qkv = (m.num_heads + 2 * m.num_kv_heads) * d // tp
    params = [Param(h), Param(h * m.num_heads * d // tp), Param(qkv * h), Param(qkv), Param(h)]
    if not m.is_moe:
        return params + [Param(2 * m.ffn_hidden_size // tp * h), Param(h * m.ffn_hidden_size // tp)]
    params.append(Param(m.num_experts * h))  # router (replicated)
    fe = m.moe_ffn_hidden_size // etp
    for _ in range(m.num_experts // ep):
        params += [Param(2 * fe * h, expert=True), Param(h * fe, expert=True)]
    if m.shared_expert_ffn_hidden_size:
        fs = m.shared_expert_ffn_hidden_size // tp
        params += [Param(2 * fs * h), Param(h * fs), Param(h)]  # fc1, fc2, sigmoid gate
    return params


def rank_params(m: ModelConfig, vocab: int, layout: Layout, pp_rank: int = 0) -> list[list[Param]]:
    """The parameters of each model chunk (virtual stage) on pipeline rank ``pp_rank``."""
    lay = layout
    per_chunk = m.num_layers // (lay.pp * lay.vpp)
    chunks = []
    for vp in range(lay.vpp):
        first = pp_rank == 0 and vp == 0
        last = pp_rank == lay.pp - 1 and vp == lay.vpp - 1
        params = []
        shared = m.tie_embeddings and not (first and last)
        if first:
            params.append(Param(vocab // lay.tp * m.hidden_size, shared_embedding=shared))
        for _ in range(per_chunk):
            params += _layer_params(m, lay.tp, lay.ep, lay.expert_tp)
        if last:
            params.append(Param(m.hidden_size))  # final norm
            if not (m.tie_embeddings and first):
                params.append(Param(vocab // lay.tp * m.hidden_size, shared_embedding=shared))
        chunks.append(params)
    return chunks


def _buffer_layout(params: list[Param], dp: int, distopt: bool) -> tuple[int, list[tuple[int, int]]]:
    """megatron-core ``_ParamAndGradBuffer`` without bucketing: (padded numel, (start, end) of each param)."""
    pad = lambda n, k: -(-n // k) * k  # noqa: E731
    divisor = math.lcm(dp, 128)
    start = bucket_start = 0
    ranges, open_params, end = [], 0, 0
    for p in reversed(params):
        if distopt:
            start = pad(start, 64)
        if distopt and p.shared_embedding and open_params:
            start = bucket_start = pad(start, divisor)
            open_params = 0
        end = start + p.numel
        ranges.append((start, end))
        open_params += 1
        if distopt and p.shared_embedding:
            start = bucket_start = pad(end, divisor)
            open_params = 0
        else:
            start = end
    total = pad(end, divisor) if distopt and open_params else (start if distopt else end)
    return total, ranges


@dataclass
class ModelStates:
    weights: float = 0.0
    gradients: float = 0.0
    master_weights: float = 0.0
    optimizer_state: float = 0.0
    comm_buffers: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.master_weights + self.optimizer_state + self.comm_buffers


def model_states(m: ModelConfig, vocab: int, layout: Layout, *, bf16: bool, pp_rank: int = 0,
                 dp_rank: int = 0) -> ModelStates:
    """Bytes of model states one rank holds (pipeline rank ``pp_rank``, data-parallel rank ``dp_rank``)."""
    if layout.zero in (2, 3):
        return _deepspeed_states(m, vocab, layout, bf16=bf16, dp_rank=dp_rank)
    elem = 2 if bf16 else 4
    distopt = layout.zero == 1
    out = ModelStates()
    for chunk in rank_params(m, vocab, layout, pp_rank):
        for expert in (False, True):
            params = [p for p in chunk if p.expert == expert]
            if not params:
                continue
            dp = layout.expert_dp if expert else layout.dp * layout.cp
            numel, ranges = _buffer_layout(params, dp, distopt)
            out.weights += numel * elem if distopt else sum(p.numel for p in params) * elem
            out.gradients += numel * 4
            if distopt:  # this rank's contiguous 1/dp of the buffer; master copies cover real elements only
                rank = dp_rank % dp
                lo, hi = rank * numel // dp, (rank + 1) * numel // dp
                shard = sum(max(0, min(e, hi) - max(s, lo)) for s, e in ranges)
            else:
                shard = sum(p.numel for p in params)
            out.master_weights += shard * 4 if bf16 else 0
            out.optimizer_state += shard * 8
    return out


def _deepspeed_states(m: ModelConfig, vocab: int, layout: Layout, *, bf16: bool, dp_rank: int) -> ModelStates:
    """DeepSpeed 0.19.8 ZeRO-2/3 with our config (two AdamW groups: matrices / 1-D tensors, fp32 reduction)."""
    (params,) = rank_params(m, vocab, layout)
    dp, elem = layout.dp, 2 if bf16 else 4
    # Megatron's weight-decay rule splits the groups: matrices decay, biases and norms (1-D) do not.
    groups = [[p.numel for p in params if not _is_1d(p, m)], [p.numel for p in params if _is_1d(p, m)]]
    out = ModelStates()
    if layout.zero == 2:
        for numels in groups:
            n = sum(numels)
            padded = -(-n // (2 * dp)) * (2 * dp)  # flat group padded to alignment 2 × dp
            part = padded // dp
            out.weights += padded * elem
            out.master_weights += part * 4
            out.gradients += part * 4
            out.optimizer_state += part * 8
        return out
    total = 0
    for numels in groups:
        part = sum(n if n_is_persistent else -(-n // dp) for n, n_is_persistent in numels_persistence(numels, m))
        total += part
        out.weights += part * elem
        out.master_weights += part * 4  # a separate fp32 partition, also for fp32 models
        out.gradients += part * 4
        out.optimizer_state += part * 8
    # ZeRO-3's reduce bucket (reduce_bucket_size elements, capped at the model size by parallel/deepspeed.py).
    out.comm_buffers += min(500_000_000, sum(p.numel for p in params)) * elem
    return out


def _is_1d(p: Param, m: ModelConfig) -> bool:
    """1-D parameters: norms and the qkv bias (all other parameters are matrices)."""
    qkv_bias = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    return p.numel in (m.hidden_size, qkv_bias) and not p.expert and not p.shared_embedding


def numels_persistence(numels: list[int], m: ModelConfig):
    """ZeRO-3 keeps 1-D tensors whole (``stage3_param_persistence_threshold`` = the largest 1-D tensor)."""
    threshold = max(m.hidden_size, (m.num_heads + 2 * m.num_kv_heads) * m.head_dim)
    return [(n, n <= threshold) for n in numels]


# --------------------------------------------------------------------------------------------------
# Activations (bytes saved for backward)
# --------------------------------------------------------------------------------------------------
@dataclass
class Activations:
    per_layer: float
    """One transformer layer, one microbatch, as stored when nothing is recomputed."""
    stored_per_layer: float
    """What a layer keeps between its forward and backward under the layout's recompute setting."""
    recompute_working: float
    """Extra bytes live while one recompute unit is re-run in backward (0 without recompute)."""
    embedding_and_loss: float
    """First stage: embedding; last stage: final norm, output layer input and the fp32 softmax the loss saves."""
    logits_transient: float
    """Last stage: the bf16 logits and their fp32 copy, live during the loss (not saved)."""


def layer_activation_bytes(m: ModelConfig, layout: Layout, seq_len: int, *, bf16: bool) -> float:
    """Bytes one transformer layer saves for one microbatch (no recompute) on one rank."""
    e = 2 if bf16 else 4
    t, cp = layout.tp, layout.cp
    s, b = seq_len // cp, layout.micro_batch_size
    h, d, a, g = m.hidden_size, m.head_dim, m.num_heads, m.num_kv_heads
    sb = s * b
    # Outside attention/MLP the sequence is split over tp with sequence parallel, replicated without.
    s_out = sb / t if layout.sequence_parallel else sb
    # RMSNorm: fp32 input copy (the input itself in fp32), its output cast back, the weight product,
    # rstd in fp32; the column-parallel linear saves the product.
    norm = s_out * (4 * h + 2 * e * h + 4)
    # Attention (heads split over tp): fused qkv output (kept by the v view), RoPE'd q and k, flash
    # output and fp32 log-sum-exp, and the RoPE cos/sin tables.
    q, kv = a * d / t, g * d / t
    attn = sb * e * ((q + 2 * kv) + q + kv + q) + sb * 4 * a / t + 4 * e * s * d
    if cp > 1:  # all-gathered K/V of the whole sequence (kept for backward), per chunk outputs
        attn += (cp * sb) * e * 2 * kv
    mlp = _mlp_bytes(m, layout, sb, e)
    return 2 * norm + attn + mlp


def _mlp_bytes(m: ModelConfig, layout: Layout, sb: float, e: int) -> float:
    t = layout.tp
    if not m.is_moe:
        # SwiGLU: fc1 output (2f), silu output, linear half + 0 offset copy, product (fc2 input).
        return 5 * e * sb * m.ffn_hidden_size / t
    h, k, E = m.hidden_size, m.moe_topk, m.num_experts
    tokens = sb / t if layout.sequence_parallel else sb  # tokens routed by this rank
    router = tokens * (4 * E * 3 + 8 * k * 2)  # fp32 logits, probs, top-k weights/indices
    routed = tokens * k  # on average each rank's experts see its share of tokens × top-k
    experts = routed * (e * h * 2 + 5 * e * m.moe_ffn_hidden_size / layout.expert_tp + 4)
    shared = 0.0
    if m.shared_expert_ffn_hidden_size:
        shared = 5 * e * sb * m.shared_expert_ffn_hidden_size / t + tokens * (e * h + 8)
    return router + experts + shared


def activations(m: ModelConfig, vocab: int, layout: Layout, seq_len: int, *, bf16: bool) -> Activations:
    e = 2 if bf16 else 4
    t, cp = layout.tp, layout.cp
    sb = seq_len // cp * layout.micro_batch_size
    s_out = sb / t if layout.sequence_parallel else sb
    per_layer = layer_activation_bytes(m, layout, seq_len, bf16=bf16)
    layer_input = s_out * m.hidden_size * e
    stored, working = per_layer, 0.0
    if layout.recompute == "full":
        n = layout.recompute_num_layers
        stored = layer_input / n  # one input per unit of n layers
        working = n * per_layer
    elif layout.recompute == "selective":
        saved = 0.0
        if "core_attn" in layout.recompute_modules:
            saved += sb * 4 * m.num_heads / t  # log-sum-exp (flash kernels keep no attention matrix)
        if "mlp" in layout.recompute_modules and not m.is_moe:  # keeps the MLP's input, drops its inside
            saved += _mlp_bytes(m, layout, sb, e)
        stored = per_layer - saved
        working = saved
    final_norm = s_out * (4 * m.hidden_size + 2 * e * m.hidden_size + 4)
    loss = sb * 4 * vocab / t + final_norm + sb * 21
    return Activations(per_layer=per_layer, stored_per_layer=stored, recompute_working=working,
                       embedding_and_loss=loss, logits_transient=sb * vocab / t * (e + 4))


def in_flight_microbatches(layout: Layout, num_microbatches: int, pp_rank: int = 0) -> float:
    """Model-chunk forwards whose activations a pipeline rank holds at its peak (megatron-core schedules).

    1F1B: rank r runs pp - r - 1 warm-up forwards, then one more before its first backward. Interleaved:
    (pp - r - 1) × 2 + (vpp - 1) × pp warm-up chunk forwards, + 1; each chunk holds layers / (pp × vpp).
    Returned in units of "the rank's whole stage" (chunk forwards / vpp)."""
    pp, vpp, m = layout.pp, layout.vpp, num_microbatches
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - pp_rank, m))
    warmup = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp, m * vpp)
    return (warmup + 1) / vpp


def stage_activation_peak(m: ModelConfig, vocab: int, layout: Layout, seq_len: int, num_microbatches: int, *,
                          bf16: bool, pp_rank: int = 0) -> tuple[float, float]:
    """(activations, logits/loss) bytes a pipeline rank holds at its peak: the in-flight microbatches of its
    layers, the recompute unit being re-run, and on the last stage the loss's saved softmax and logits."""
    act = activations(m, vocab, layout, seq_len, bf16=bf16)
    layers = m.num_layers // layout.pp
    held = in_flight_microbatches(layout, num_microbatches, pp_rank) * layers * act.stored_per_layer
    loss = act.embedding_and_loss + act.logits_transient if pp_rank == layout.pp - 1 else 0.0
    # The loss's tensors are freed by its backward, before any layer is recomputed: the peak is at the
    # end of the last forward (held + loss) or during the first recompute (held + working), whichever is larger.
    return held + max(0.0, act.recompute_working - loss), loss
