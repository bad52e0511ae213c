"""Per-rank memory of parameters, gradients and optimizer state under ZeRO-0/1/2/3, measured vs analytic.

    python benchmarks/bench_zero_memory.py [--dp 2 4] [--layers 4 --hidden 256 --vocab 8192]

Each ZeRO stage trains the same small fp32 Qwen2 through ``build_train_module`` (stages 0/1: megatron-core
DDP / distributed optimizer; 2/3: DeepSpeed) on ``dp`` gloo ranks for two steps. Just before the second
optimizer step -- gradients reduced, Adam moments allocated: the high-water mark of training state --
every rank counts the bytes of the tensor storages it holds, each storage once, in the first category
that claims it (``pretrain.plan.measure.model_state_bytes``, what the planner is checked against):

* params:  the model's parameters (ZeRO-3: this rank's partitions ``ds_tensor`` + persistent 1-D tensors)
* grads:   reduced gradients (megatron's grad buffer; DeepSpeed's partition of the reduced gradients)
* master:  fp32 master weights the optimizer steps, when they are a separate copy (DeepSpeed keeps one
           even for fp32 models, at ZeRO-2 and ZeRO-3; megatron's fp32 shards are views into the parameter buffer)
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
import gc
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from benchmarks.harness import job, markdown_table  # noqa: E402
from parallel.testing import run_distributed  # noqa: E402

MiB = 2**20
# pretrain.plan.measure's categories, under this table's names.
CATEGORIES = {"weights": "params", "gradients": "grads", "master_weights": "master", "optimizer_state": "adam",
              "comm_buffers": "buckets", "other": "other"}


def _job(args, zero: int, world_size: int):
    """A small fp32 Qwen2 (ModelConfig's defaults otherwise) on ``world_size`` ranks at ZeRO ``zero``."""
    return job(["model=qwen2_tiny", "model.name=bench", f"model.hidden_size={args.hidden}",
                f"model.ffn_hidden_size={int(args.hidden * 2.75) // 8 * 8}", f"model.num_layers={args.layers}",
                "model.num_heads=8", "model.num_kv_heads=4", f"model.vocab_size={args.vocab}", "model.max_seq_len=4096",
                f"data.seq_len={args.seq}", "parallel=single", f"parallel.zero={zero}", "trainer.steps=2",
                "trainer.micro_batch_size=1", f"trainer.global_batch_size={world_size}",
                "trainer.precision=fp32", "trainer.wandb.mode=disabled"], world_size=world_size)


def run_stage(rank: int, world_size: int, args, zeros: list[int]) -> dict:
    from megatron.core import parallel_state as ps

    from parallel.mesh import init_distributed
    from pretrain.build import build_train_module
    from pretrain.plan.measure import before_optimizer_step, model_state_bytes, parameter_count

    results = {}
    for zero in zeros:
        stage = _job(args, zero, world_size)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_distributed(stage.parallel, seed=0)
        module = build_train_module(stage, vocab_size=args.vocab)
        seen = {}

        def measure(_module=module, _seen=seen):
            _seen["bytes"] = model_state_bytes(_module, other=True)  # the second step's measurement is kept

        g = torch.Generator().manual_seed(rank)
        with before_optimizer_step(module, measure):
            for _ in range(2):
                tokens = torch.randint(0, args.vocab, (1, args.seq), generator=g)
                mb = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(1, args.seq),
                      "position_ids": torch.arange(args.seq).unsqueeze(0)}
                module.train_batch([mb])
        results[zero] = {"bytes": {CATEGORIES[k]: v for k, v in seen["bytes"].items()},
                         "params": parameter_count(module)}
        del module, measure
        gc.collect()
    return results


def analytic(zero: int, psi: int, dp: int) -> dict[str, float]:
    p, g, a = 4 * psi, 4 * psi, 8 * psi
    return {"params": p / dp if zero >= 3 else p, "grads": g / dp if zero >= 2 else g, "adam": a / dp if zero >= 1 else a}


def print_table(args, measured: list[tuple]) -> None:
    """One row per (dp, ZeRO): MiB of rank 0, measured / analytic."""
    psi = measured[0][2]
    print(f"\nModel: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: Ψ = {psi / 1e6:.2f}M fp32 "
          f"parameters ({4 * psi / MiB:.1f} MiB). MiB per rank (rank 0), measured / analytic.\n")

    def core(b: dict) -> int:
        return b["params"] + b["grads"] + b["master"] + b["adam"]

    rows = []
    for dp, zero, _, b, per_rank in measured:
        a = analytic(zero, psi, dp)
        spread = max(map(core, per_rank)) - min(map(core, per_rank))
        rows.append([dp, zero, f"{b['params'] / MiB:.1f} / {a['params'] / MiB:.1f}",
                     f"{b['grads'] / MiB:.1f} / {a['grads'] / MiB:.1f}", f"{b['master'] / MiB:.1f} / 0",
                     f"{b['adam'] / MiB:.1f} / {a['adam'] / MiB:.1f}", f"{core(b) / MiB:.1f}", f"{sum(a.values()) / MiB:.1f}",
                     f"{b['buckets'] / MiB:.1f}", f"{b['other'] / MiB:.1f}", f"{spread / MiB:.2f}"])
    print("\n".join(markdown_table(["dp", "ZeRO", "params", "grads", "master copy", "Adam state", "params+grads+master+Adam",
                                    "analytic 4Ψ+4Ψ+8Ψ sharded", "buckets", "other live tensors",
                                    "max spread over ranks"], rows)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args(argv)
    if any(zero >= 2 for zero in args.zero):
        import deepspeed  # noqa: F401 - once, before the ranks fork (each rank's build then finds it imported)
    rows_measured = []
    for dp in args.dp:
        for zero in args.zero:  # fresh ranks per stage: a DeepSpeed engine is not freed by gc in-process
            start = time.time()
            ranks = run_distributed(run_stage, dp, args, [zero], timeout=600)
            print(f"dp={dp} zero={zero}: {time.time() - start:.0f} s", file=sys.stderr)
            r0 = ranks[0][zero]
            rows_measured.append((dp, zero, r0["params"], r0["bytes"], [r[zero]["bytes"] for r in ranks]))
    print_table(args, rows_measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
