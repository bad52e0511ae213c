"""Per-rank memory of parameters, gradients and optimizer state under ZeRO-0/1/2/3, measured vs analytic.

    python benchmarks/bench_zero_memory.py [--dp 2 4] [--layers 4 --hidden 256 --vocab 8192]

Each ZeRO stage trains the same small fp32 Qwen2 through ``build_train_module`` (stages 0/1: megatron-core
DDP / distributed optimizer; 2/3: DeepSpeed) on ``dp`` gloo ranks for two steps. Just before the second
optimizer step -- gradients reduced, Adam moments allocated: the high-water mark of training state --
every rank counts the bytes of the tensor storages it holds, each storage once, in the first category
that claims it:

* params:  the model's parameters (ZeRO-3: this rank's partitions ``ds_tensor`` + persistent 1-D tensors)
* grads:   reduced gradients (megatron's grad buffer; DeepSpeed's partition of the reduced gradients)
* master:  fp32 master weights the optimizer steps, when they are a separate copy (DeepSpeed keeps one
           even for fp32 models; megatron's fp32 shards are views into the parameter buffer)
* adam:    the torch AdamW state (exp_avg, exp_avg_sq, step)
* buckets: DeepSpeed's gradient reduction bucket(s) (transient in principle, allocated once and kept)
* other:   every other live tensor the garbage collector can see (RoPE tables; under ZeRO-2 DeepSpeed's
           ``round_robin_bit16_meta``, a second copy of the first parameter group's unflattened tensors)

Analytic fp32 figures with Ψ parameters (ZeRO paper, K = 8 for Adam in fp32): ZeRO-0 params 4Ψ + grads 4Ψ
+ Adam 8Ψ; ZeRO-1 shards Adam (8Ψ/dp); ZeRO-2 also gradients (4Ψ/dp); ZeRO-3 also parameters (4Ψ/dp).
Prints a markdown table (MiB per rank; rank 0; the ranks differ by padding only).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from parallel.testing import run_distributed  # noqa: E402

MiB = 2**20
CATEGORIES = ("params", "grads", "master", "adam", "buckets", "other")


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes()) if s.nbytes() else None


def _inner_optimizers(module) -> list[torch.optim.Optimizer]:
    if hasattr(module, "engine"):
        return [module.engine.optimizer.optimizer]
    opt = module.optimizer
    return [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]


def _claims(module) -> dict[str, list[torch.Tensor]]:
    """Tensors per category, in the order categories claim storages."""
    claims: dict[str, list[torch.Tensor]] = {c: [] for c in CATEGORIES}
    chunks = [module.model] if hasattr(module, "engine") else module.chunks
    params = [p for c in chunks for p in c.parameters()]
    claims["params"] = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]
    if hasattr(module, "engine"):  # DeepSpeed's flat parameter buffers (ZeRO-2: whole; ZeRO-3: this rank's part)
        zopt = module.engine.optimizer
        for name in ("bit16_groups_flat", "fp16_partitioned_groups_flat"):
            claims["params"] += [t for t in getattr(zopt, name, None) or [] if torch.is_tensor(t)]
    claims["grads"] = [p.main_grad for p in params if getattr(p, "main_grad", None) is not None]
    claims["grads"] += [p.grad for p in params if p.grad is not None]
    claims["grads"] += [p.grad_accum for p in params if getattr(p, "grad_accum", None) is not None]  # DeepSpeed
    for opt in _inner_optimizers(module):
        for group in opt.param_groups:
            claims["master"] += group["params"]
            claims["grads"] += [p.grad for p in group["params"] if p.grad is not None]
        claims["adam"] += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    if hasattr(module, "engine"):
        zopt = module.engine.optimizer
        averaged = getattr(zopt, "averaged_gradients", {}) or {}
        for grads in averaged.values():
            claims["grads"] += [g for g in (grads if isinstance(grads, list) else [grads]) if torch.is_tensor(g)]
        for name in ("grads_in_partition", "grad_partitions_flat_buffer",
                     "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
            value = getattr(zopt, name, None)
            values = value.values() if isinstance(value, dict) else [value]
            claims["grads"] += [v for v in values if torch.is_tensor(v)]
        for bucket in (getattr(zopt, "ipg_buckets", {}) or {}).values():
            claims["buckets"] += [v for v in vars(bucket).values() if torch.is_tensor(v)]
        claims["buckets"] += [t for t in getattr(zopt, "ipg_buffer", None) or [] if torch.is_tensor(t)]
    return claims


def measure(module) -> dict[str, int]:
    """Bytes per category on this rank; each storage counted once."""
    seen: set[int] = set()
    out = {c: 0 for c in CATEGORIES}
    for category, tensors in _claims(module).items():
        for t in tensors:
            st = _storage(t)
            if st is not None and st[0] not in seen:
                seen.add(st[0])
                out[category] += st[1]
    gc.collect()
    for obj in gc.get_objects():
        try:
            is_tensor = torch.is_tensor(obj)
        except Exception:  # noqa: BLE001 - odd objects in gc
            continue
        if is_tensor:
            st = _storage(obj)
            if st is not None and st[0] not in seen:
                seen.add(st[0])
                out["other"] += st[1]
    return out


def _job(args, zero: int):
    from parallel.config import ParallelConfig
    from pretrain.config import DataConfig, JobConfig, OptimConfig, TrainerConfig, WandbConfig
    from pretrain.models.config import ModelConfig

    model = ModelConfig(name="bench", hidden_size=args.hidden, ffn_hidden_size=int(args.hidden * 2.75) // 8 * 8,
                        num_layers=args.layers, num_heads=8, num_kv_heads=4, vocab_size=args.vocab)
    return JobConfig(model=model, data=DataConfig(seq_len=args.seq), parallel=ParallelConfig(zero=zero),
                     optim=OptimConfig(), trainer=TrainerConfig(steps=2, micro_batch_size=1, global_batch_size=args.dp_max,
                                                                wandb=WandbConfig(mode="disabled")))


def run_stage(rank: int, world_size: int, args, zeros: list[int]) -> dict:
    from megatron.core import parallel_state as ps

    from parallel.mesh import init_distributed
    from pretrain.build import build_train_module
    from pretrain.config import validate_job

    results = {}
    for zero in zeros:
        job = _job(args, zero)
        job = dataclasses.replace(job, trainer=dataclasses.replace(job.trainer, global_batch_size=world_size))
        validate_job(job, world_size)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_distributed(job.parallel, seed=0)
        module = build_train_module(job, vocab_size=args.vocab)
        chunks = [module.model] if hasattr(module, "engine") else module.chunks
        n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for c in chunks for p in c.parameters())
        step_owner = module.engine.optimizer if hasattr(module, "engine") else module.optimizer
        original, seen = step_owner.step, {}

        def step(*a, _original=original, _seen=seen, _module=module, **kw):
            _seen["bytes"] = measure(_module)  # the second step's measurement is kept
            return _original(*a, **kw)

        step_owner.step = step
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            tokens = torch.randint(0, args.vocab, (1, args.seq), generator=g)
            mb = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(1, args.seq),
                  "position_ids": torch.arange(args.seq).unsqueeze(0)}
            module.train_batch([mb])
        results[zero] = {"bytes": seen["bytes"], "params": n_params}
        del module, step_owner, original
        gc.collect()
    return results


def analytic(zero: int, psi: int, dp: int) -> dict[str, float]:
    p, g, a = 4 * psi, 4 * psi, 8 * psi
    return {"params": p / dp if zero >= 3 else p, "grads": g / dp if zero >= 2 else g, "adam": a / dp if zero >= 1 else a}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args(argv)
    args.dp_max = max(args.dp)
    from parallel.deepspeed import _import_deepspeed

    _import_deepspeed()  # once, before the ranks fork
    rows = []
    for dp in args.dp:
        for zero in args.zero:  # fresh ranks per stage: a DeepSpeed engine is not freed by gc in-process
            start = time.time()
            ranks = run_distributed(run_stage, dp, args, [zero], timeout=600)
            print(f"dp={dp} zero={zero}: {time.time() - start:.0f} s", file=sys.stderr)
            r0 = ranks[0][zero]
            rows.append((dp, zero, r0["params"], r0["bytes"], [r[zero]["bytes"] for r in ranks]))
    psi = rows[0][2]
    print(f"\nModel: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: Ψ = {psi / 1e6:.2f}M fp32 "
          f"parameters ({4 * psi / MiB:.1f} MiB). MiB per rank (rank 0), measured / analytic.\n")
    print("| dp | ZeRO | params | grads | master copy | Adam state | params+grads+master+Adam | analytic 4Ψ+4Ψ+8Ψ sharded "
          "| buckets | other live tensors | max spread over ranks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dp, zero, _, b, per_rank in rows:
        a = analytic(zero, psi, dp)
        core = b["params"] + b["grads"] + b["master"] + b["adam"]
        spread = max(sum(r[c] for c in ("params", "grads", "master", "adam")) for r in per_rank) - min(
            sum(r[c] for c in ("params", "grads", "master", "adam")) for r in per_rank)
        print(f"| {dp} | {zero} | {b['params'] / MiB:.1f} / {a['params'] / MiB:.1f} | {b['grads'] / MiB:.1f} / "
              f"{a['grads'] / MiB:.1f} | {b['master'] / MiB:.1f} / 0 | {b['adam'] / MiB:.1f} / {a['adam'] / MiB:.1f} | "
              f"{core / MiB:.1f} | {sum(a.values()) / MiB:.1f} | {b['buckets'] / MiB:.1f} | {b['other'] / MiB:.1f} | "
              f"{spread / MiB:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
