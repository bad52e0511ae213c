"""Enumerate the layouts of a job, predict each one's memory and step time, and rank them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from common.errors import ConfigError
from parallel.config import ParallelConfig
from parallel.layout import ParallelLayout
from pretrain.models.config import ModelConfig
from pretrain.models import registry
from pretrain.plan.hardware import GPU
from pretrain.plan.memory import GiB, Layout, model_states, stage_activation_peak
from pretrain.plan.timing import step_time


@dataclass
class Estimate:
    layout: Layout
    memory: dict = field(default_factory=dict)
    """GiB per GPU at the worst pipeline rank: weights, gradients, optimizer_state (master weights + Adam),
    activations, logits_loss, comm_buffers, reserved, total; activations_per_stage lists every stage."""
    time: dict = field(default_factory=dict)
    """Seconds per step: compute, tp_comm, cp_comm, ep_comm, pp_bubble, dp_comm, total."""
    tokens_per_s_per_gpu: float = 0.0
    mfu: float = 0.0
    feasible: bool = True
    reason: str = ""

    def as_json(self) -> dict:
        lay = dataclasses.asdict(self.layout)
        lay["recompute_modules"] = list(lay["recompute_modules"])
        return {"layout": lay, "memory_gib": self.memory, "time_s": self.time,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu, "mfu": self.mfu, "feasible": self.feasible,
                "reason": self.reason}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _largest_term(memory: dict) -> str:
    terms = {k: v for k, v in memory.items() if k not in ("total", "activations_per_stage", "reserved")}
    return max(terms, key=terms.get)


def estimate(m: ModelConfig, vocab: int, lay: Layout, gpu: GPU, *, seq_len: int, global_batch_size: int,
             bf16: bool = True, reserved_gib: float = 0.0, fsdp_prefetch: bool = False) -> Estimate:
    """Memory and time of one layout (no validity checks: see :func:`check_layout`)."""
    n_micro = global_batch_size // (lay.micro_batch_size * lay.dp)
    worst, per_stage = None, []
    for pp_rank in sorted({0, lay.pp - 1}):
        states = model_states(m, vocab, lay, bf16=bf16, pp_rank=pp_rank)
        act, loss = stage_activation_peak(m, vocab, lay, seq_len, n_micro, bf16=bf16, pp_rank=pp_rank)
        p2p = 2 * seq_len // lay.cp * lay.micro_batch_size * m.hidden_size * (2 if bf16 else 4) if lay.pp > 1 else 0
        mem = {"weights": states.weights / GiB, "gradients": states.gradients / GiB,
               "optimizer_state": (states.master_weights + states.optimizer_state) / GiB,
               "activations": act / GiB, "logits_loss": loss / GiB, "comm_buffers": (states.comm_buffers + p2p) / GiB,
               "reserved": reserved_gib}
        mem["total"] = sum(mem.values())
        per_stage.append(round(act / GiB, 3))
        if worst is None or mem["total"] > worst["total"]:
            worst = mem
    worst["activations_per_stage"] = per_stage
    t = step_time(m, vocab, lay, gpu, seq_len, n_micro, bf16=bf16, fsdp_prefetch=fsdp_prefetch)
    times = {"compute": t.compute, "tp_comm": t.tp_comm, "cp_comm": t.cp_comm, "ep_comm": t.ep_comm,
             "pp_bubble": t.pp_bubble, "dp_comm": t.dp_comm, "total": t.total}
    tps = global_batch_size * seq_len / t.total / lay.gpus
    mfu = tps * registry.get(m.family).flops_per_token(m, seq_len, vocab) / (gpu.bf16_tflops * 1e12)
    est = Estimate(layout=lay, memory=worst, time=times, tokens_per_s_per_gpu=tps, mfu=mfu)
    if worst["total"] > gpu.memory_gib:
        est.feasible = False
        est.reason = (f"needs {worst['total']:.1f} GiB of {gpu.memory_gib:.1f} (largest: {_largest_term(worst)} "
                      f"{worst[_largest_term(worst)]:.1f} GiB)")
    return est


def check_layout(m: ModelConfig, lay: Layout, *, gpus: int, seq_len: int, global_batch_size: int) -> str:
    """The trainer's own checks (``ParallelLayout.resolve`` / ``check_model`` and the batch geometry): '' or the reason."""
    try:
        parallel = ParallelConfig(tp=lay.tp, pp=lay.pp, vpp=lay.vpp, cp=lay.cp, ep=lay.ep, etp=lay.etp, dp=lay.dp,
                                  sequence_parallel=lay.sequence_parallel, zero=lay.zero)
        ParallelLayout.resolve(parallel, world_size=gpus).check_model(
            num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, num_experts=m.num_experts,
            seq_len=seq_len)
    except ConfigError as exc:
        return str(exc)
    per_step = lay.micro_batch_size * lay.dp
    if global_batch_size % per_step:
        return f"global batch {global_batch_size} is not a multiple of micro-batch × dp = {per_step}"
    if lay.vpp > 1 and (global_batch_size // per_step) % lay.pp:
        return "the interleaved schedule needs the microbatch count to be a multiple of pp"
    if m.is_moe and lay.tp > 1 and not lay.sequence_parallel:
        return "MoE with tp > 1 needs sequence parallel"
    if lay.recompute == "full" and (m.num_layers // (lay.pp * lay.vpp)) % lay.recompute_num_layers:
        return "recompute_num_layers must divide the layers of each stage"
    return ""


def candidates(m: ModelConfig, *, gpus: int, seq_len: int, micro_batch_sizes, recompute, zero, max_vpp: int,
               gpus_per_node: int, recompute_modules: tuple[str, ...]) -> list[Layout]:
    out = []
    tps = [t for t in _divisors(gpus) if t <= gpus_per_node and m.num_kv_heads % t == 0]
    experts = _divisors(m.num_experts) if m.is_moe else [1]
    for tp in tps:
        for pp in _divisors(gpus // tp):
            if m.num_layers % pp:
                continue
            for cp in [c for c in _divisors(gpus // (tp * pp)) if c <= 8 and seq_len % (2 * c) == 0]:
                dp = gpus // (tp * pp * cp)
                for vpp in [v for v in range(1, max_vpp + 1) if pp > 1 or v == 1]:
                    if m.num_layers % (pp * vpp):
                        continue
                    for ep in [e for e in experts if (tp * cp * dp) % e == 0]:
                        for z in zero:
                            if z >= 2 and (tp, pp, cp, ep) != (1, 1, 1, 1):
                                continue
                            for mbs in micro_batch_sizes:
                                for rc in recompute:
                                    out.append(Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, dp=dp,
                                                      sequence_parallel=tp > 1, zero=z, micro_batch_size=mbs,
                                                      recompute=rc, recompute_modules=recompute_modules))
    return out


def plan(m: ModelConfig, vocab: int, gpu: GPU, *, gpus: int, seq_len: int, global_batch_size: int, bf16: bool,
         micro_batch_sizes=(1, 2, 4), recompute=("none", "selective", "full"), zero=(0, 1, 3), max_vpp: int = 4,
         reserved_gib: float = 4.0, recompute_modules: tuple[str, ...] = ("core_attn", "mlp")) -> list[Estimate]:
    """Every candidate layout, feasible ones first (fastest first), then infeasible ones with their reason."""
    results = []
    for lay in candidates(m, gpus=gpus, seq_len=seq_len, micro_batch_sizes=micro_batch_sizes, recompute=recompute,
                          zero=zero, max_vpp=max_vpp, gpus_per_node=gpu.gpus_per_node,
                          recompute_modules=recompute_modules):
        reason = check_layout(m, lay, gpus=gpus, seq_len=seq_len, global_batch_size=global_batch_size)
        if reason:
            results.append(Estimate(layout=lay, feasible=False, reason=reason))
            continue
        results.append(estimate(m, vocab, lay, gpu, seq_len=seq_len, global_batch_size=global_batch_size,
                                bf16=bf16, reserved_gib=reserved_gib))
    return sorted(results, key=lambda e: (not e.feasible, -e.tokens_per_s_per_gpu, e.memory.get("total", 0)))
