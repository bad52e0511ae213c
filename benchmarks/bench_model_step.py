"""One training step (forward, backward, AdamW) of this project's megatron-core Qwen2 vs transformers'.

Both models hold the same weights (copied through ``pretrain.models.hf``) and see the
same batch; steps alternate between the two so that noise from other processes on the machine hits
both alike. Reported: the median step time of each after warm-up and the ratio megatron / transformers
(> 1: ours is slower).

    python benchmarks/bench_model_step.py                       # tiny dense + tiny MoE, table
    python benchmarks/bench_model_step.py --json                # one JSON document on stdout
    python benchmarks/bench_model_step.py --json results.json --steps 20 --seq-len 512

Both sides use torch SDPA attention, fp32, no dropout, ``torch.optim.AdamW`` (foreach) with the same
hyper-parameters. The megatron side is the bare ``GPTModel`` chunk (no DDP wrapper or megatron
optimizer: a single process has nothing to reduce). For the MoE, transformers is run with
``output_router_logits=True`` so that both compute a load-balancing loss (their formulas differ; see
pretrain/models/qwen2/state_dict.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from benchmarks.harness import emit, job

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen2_tiny,qwen2_moe_tiny", help="conf/model presets, comma-separated")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary (the tiny presets take it from data)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="measured steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write results as JSON to PATH (or stdout with no PATH) instead of the table")
    return p.parse_args(argv)


def _megatron_step(chunk, optimizer, tokens, labels, position_ids) -> float:
    loss = chunk(tokens, position_ids, None, labels=labels)[:, :-1].mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _hf_step(model, optimizer, tokens) -> float:
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)


def model_job(preset: str, args: argparse.Namespace):
    return job([f"model={preset}", "parallel=single", f"model.vocab_size={args.vocab_size}",
                f"model.max_seq_len={max(args.seq_len, 128)}"])


def bench_one(preset: str, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from pretrain.models import registry
    from pretrain.models.hf import hf_config_from_model, hf_state_dict_from_module, load_hf_into_chunks

    model = model_job(preset, args).model
    hf_config = hf_config_from_model(model)
    if model.is_moe:
        hf_config.output_router_logits = True
    torch.manual_seed(args.seed)
    hf_model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").train()
    family = registry.get(model.family)  # the bare GPTModel chunk, as the trainer's build makes it
    (chunk,) = family.build_model_chunks(model, family.transformer_config(model), args.vocab_size)
    load_hf_into_chunks([chunk], hf_state_dict_from_module(hf_model), model)
    chunk.train()
    opt_m, opt_h = _adamw(chunk.parameters()), _adamw(hf_model.parameters())

    g = torch.Generator().manual_seed(args.seed)
    b, s = args.batch_size, args.seq_len
    tokens = torch.randint(0, args.vocab_size, (b, s), generator=g)
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # last position is dropped from the loss
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)

    times_m, times_h, losses_m, losses_h = [], [], [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        losses_m.append(_megatron_step(chunk, opt_m, tokens, labels, position_ids))
        t1 = time.perf_counter()
        losses_h.append(_hf_step(hf_model, opt_h, tokens))
        t2 = time.perf_counter()
        if step >= args.warmup:
            times_m.append(t1 - t0)
            times_h.append(t2 - t1)
    med_m, med_h = statistics.median(times_m), statistics.median(times_h)
    return {
        "model": preset,
        "parameters": sum(p.numel() for p in chunk.parameters()),
        "megatron_step_s": med_m,
        "transformers_step_s": med_h,
        "ratio_megatron_over_transformers": med_m / med_h,
        "megatron_tokens_per_s": b * s / med_m,
        "transformers_tokens_per_s": b * s / med_h,
        "megatron_step_s_all": times_m,
        "transformers_step_s_all": times_h,
        # Same weights and batch: step-0 losses agree (dense exactly up to fp32 noise; the MoE's HF loss
        # includes router_aux_loss_coef * its aux loss). They then follow the same optimiser path.
        "loss_first": {"megatron": losses_m[0], "transformers": losses_h[0]},
        "loss_last": {"megatron": losses_m[-1], "transformers": losses_h[-1]},
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    from parallel.mesh import destroy_distributed, init_distributed

    presets = args.models.split(",")
    init_distributed(model_job(presets[0], args).parallel, seed=args.seed)  # 1 rank: megatron's layers query it
    try:
        results = [bench_one(preset, args) for preset in presets]
    finally:
        destroy_distributed()
    doc = {
        "benchmark": "bench_model_step",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average_after": os.getloadavg()},
        "results": results,
    }
    emit(doc, args.json, lambda: print_table(doc, args))
    return 0


def print_table(doc: dict, args: argparse.Namespace) -> None:
    print(f"batch {args.batch_size} x seq {args.seq_len}, vocab {args.vocab_size}, {args.threads} thread(s), "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'model':16s} {'params':>9s} {'megatron s':>11s} {'HF s':>9s} {'ratio':>6s}  first loss (mcore / HF)")
    for r in doc["results"]:
        print(f"{r['model']:16s} {r['parameters']:9d} {r['megatron_step_s']:11.4f} {r['transformers_step_s']:9.4f} "
              f"{r['ratio_megatron_over_transformers']:6.2f}  {r['loss_first']['megatron']:.5f} / "
              f"{r['loss_first']['transformers']:.5f}")


if __name__ == "__main__":
    sys.exit(main())
