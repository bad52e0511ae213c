"""The layout planner's predicted throughput against published training runs (BF16, dense Llama shapes).

    python benchmarks/bench_planner_published.py        # a markdown table on stdout

Each row is a published (model, GPUs, layout, tokens/s per GPU) figure; the planner predicts tokens/s/GPU
for the same model shape, layout, sequence length and batch on the same GPU type, and the error is
(predicted - published) / published. FSDP runs map onto ZeRO-3 with prefetch overlap (torchtitan's FSDP2
overlaps its all-gathers and reduce-scatters with compute). Llama shapes differ from Qwen2 only in the
QKV bias (negligible) and vocabulary, so they go through the same ModelConfig.

Sources (files read from the stored GitHub snapshots; commits named):
* torchtitan docs/performance.md @ 0413364 (64 A100 80GB, FSDP2, local batch 1-2): Llama 3 8B/70B, Llama 2 13B/70B.
* torchtitan benchmarks/llama3_h100_202412_torchtitan.md @ b5bcd76 (Grand Teton H100 96GB HBM2e at 500 W,
  Llama 3.1 8B, FSDP, local batch 2, seq 8192, selective AC), tables 1 and 3 (BF16 rows only).
The NeMo / Megatron-Bridge DGX-H100 tables (NVIDIA/NeMo docs/source/performance/performance_summary.md,
Megatron-Bridge docs/performance-summary*.md) publish FP8 runs for dense models on H100; the planner models
BF16 only, so those rows are not compared (see RESULTS.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.harness import markdown_table
from pretrain.models.config import ModelConfig
from pretrain.plan.hardware import GPUS, GPU
from pretrain.plan.memory import Layout
from pretrain.plan.search import estimate

LLAMA = {
    "llama3_8b": ModelConfig(name="llama3_8b", hidden_size=4096, ffn_hidden_size=14336, num_layers=32, num_heads=32,
                             num_kv_heads=8, vocab_size=128256, max_seq_len=8192),
    "llama3_70b": ModelConfig(name="llama3_70b", hidden_size=8192, ffn_hidden_size=28672, num_layers=80,
                              num_heads=64, num_kv_heads=8, vocab_size=128256, max_seq_len=8192),
    "llama2_13b": ModelConfig(name="llama2_13b", hidden_size=5120, ffn_hidden_size=13824, num_layers=40,
                              num_heads=40, num_kv_heads=40, vocab_size=32000, max_seq_len=4096),
    "llama2_70b": ModelConfig(name="llama2_70b", hidden_size=8192, ffn_hidden_size=28672, num_layers=80,
                              num_heads=64, num_kv_heads=8, vocab_size=32000, max_seq_len=4096),
}
TT_A100 = "torchtitan docs/performance.md @0413364, 64 A100 80GB, FSDP2"
TT_H100 = "torchtitan benchmarks/llama3_h100_202412_torchtitan.md @b5bcd76, H100 (500 W)"
# The Grand Teton H100 (HBM2e, 500 W) is slower than an SXM5 at 700 W; torchtitan says its peak lies between
# SXM and NVL (NVL: 835 TFLOP/s dense BF16). Modelled at the NVL peak with HBM at 2.4 TB/s (their figure).
H100_500W = GPU("H100 96GB HBM2e 500W", 96e9 / 2**30, 835.0, 2.4, 450, 50, source="torchtitan's description")

# (model, gpu, gpus, seq, local batch, recompute, published tokens/s/GPU, source, note)
ROWS = [
    ("llama3_8b", GPUS["a100_80gb"], 64, 8192, 1, "selective", 2904, TT_A100, "selective layer AC"),
    ("llama3_8b", GPUS["a100_80gb"], 64, 8192, 1, "selective", 2973, TT_A100, "selective op AC"),
    ("llama3_70b", GPUS["a100_80gb"], 64, 8192, 1, "full", 331, TT_A100, "full AC"),
    ("llama2_13b", GPUS["a100_80gb"], 64, 4096, 2, "none", 2162, TT_A100, "no AC"),
    ("llama2_13b", GPUS["a100_80gb"], 64, 4096, 2, "selective", 1904, TT_A100, "selective op AC"),
    ("llama2_70b", GPUS["a100_80gb"], 64, 4096, 1, "selective", 355, TT_A100, "selective op AC"),
    ("llama2_70b", GPUS["a100_80gb"], 64, 4096, 2, "full", 353, TT_A100, "full AC"),
    ("llama3_8b", H100_500W, 8, 8192, 2, "selective", 5762, TT_H100, "table 1, FSDP (no compile)"),
    ("llama3_8b", H100_500W, 128, 8192, 2, "selective", 5605, TT_H100, "table 3, FSDP (no compile)"),
]


def compare() -> list[dict]:
    out = []
    for name, gpu, gpus, seq, lbs, rc, published, source, note in ROWS:
        lay = Layout(dp=gpus, zero=3, micro_batch_size=lbs, recompute=rc, recompute_modules=("core_attn",))
        est = estimate(LLAMA[name], LLAMA[name].vocab_size, lay, gpu, seq_len=seq, global_batch_size=lbs * gpus,
                       bf16=True, fsdp_prefetch=True)
        predicted = est.tokens_per_s_per_gpu
        out.append(dict(model=name, gpu=gpu.name, gpus=gpus, seq=seq, layout=f"FSDP{gpus} (ZeRO-3), lbs {lbs}, "
                        f"AC {rc}", published=published, predicted=predicted,
                        error=(predicted - published) / published, source=source, note=note,
                        memory=est.memory["total"] - est.memory["reserved"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    rows = compare()
    columns = ["model", "GPUs", "seq", "layout", "published tok/s/GPU", "predicted", "error", "predicted memory GiB",
               "source"]
    print("\n".join(markdown_table(columns, [
        [r["model"], f"{r['gpus']} × {r['gpu']}", r["seq"], f"{r['layout']} ({r['note']})", f"{r['published']:,}",
         f"{r['predicted']:,.0f}", f"{100 * r['error']:+.1f}%", f"{r['memory']:.1f}", r["source"]] for r in rows])))
    errors = [abs(r["error"]) for r in rows]
    print(f"\nmedian |error| {100 * statistics.median(errors):.1f}% over {len(rows)} published runs "
          f"(max {100 * max(errors):.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
