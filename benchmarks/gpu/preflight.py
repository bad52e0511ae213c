"""Preflight of the GPU call (benchmarks/gpu/run.sh): is this machine what the timed runs assume?

    python benchmarks/gpu/preflight.py --json $OUT/preflight.json      # on the GPU
    python benchmarks/gpu/preflight.py --dry-run --json -              # CPU rehearsal (gloo, tiny shapes)

1. A one-rank collective on the backend training uses (NCCL on GPU): all_reduce of a known tensor.
2. Per model shape of the timed runs (heads, KV heads, head_dim at the benchmark's sequence length, bf16,
   causal, GQA as our SDPAttention calls it): which SDPA backends accept it, each one's forward+backward time
   (median of CUDA-event-timed repeats), and the backend torch picks by itself (read from the profiler).
3. A bf16 matmul ceiling: an 8192^3 product on random data (never zeros: they run faster), median TFLOP/s.
   The timed runs report their TFLOP/s as a fraction of it.
Writes one JSON document; prints a short summary. Exit 1 if the collective fails.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# name -> (query heads, kv heads, head_dim): conf/model presets of the timed runs
SHAPES = {"qwen2_1_5b": (12, 2, 128), "qwen1_5_moe_a2_7b": (16, 16, 128), "qwen2_0_5b": (14, 2, 64)}


def _timer(fn, repeats: int, on_gpu: bool) -> float:
    """Median seconds of ``fn()`` after one warm-up call (CUDA events on GPU, perf_counter on CPU)."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def collective(on_gpu: bool) -> dict:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if on_gpu else "gloo"
    t0 = time.perf_counter()
    try:
        dist.init_process_group(backend, rank=0, world_size=1)
        x = torch.arange(1024, dtype=torch.float32, device="cuda" if on_gpu else "cpu")
        dist.all_reduce(x)
        if on_gpu:
            torch.cuda.synchronize()
        ok = bool(torch.equal(x.cpu(), torch.arange(1024, dtype=torch.float32)))
        error = None if ok else "all_reduce returned wrong values"
    except Exception as exc:  # noqa: BLE001 - reported, and the call stops
        ok, error = False, f"{type(exc).__name__}: {exc}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return {"backend": backend, "ok": ok, "error": error, "seconds": round(time.perf_counter() - t0, 3)}


def sdpa(seq: int, shapes: dict, on_gpu: bool, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    out = {}
    for name, (heads, kv, dim) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, heads, seq, dim, device=dev, dtype=dtype, generator=g, requires_grad=True)
        k = torch.randn(1, kv, seq, dim, device=dev, dtype=dtype, generator=g, requires_grad=True)
        v = torch.randn(1, kv, seq, dim, device=dev, dtype=dtype, generator=g, requires_grad=True)
        grad = torch.randn(1, heads, seq, dim, device=dev, dtype=dtype, generator=g)

        def step():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads)
            o.backward(grad)

        # causal attention FLOPs, forward + backward (x3.5: backward recomputes the scores), as FlashAttention counts
        flops = 3.5 * 4 * heads * seq * seq * dim / 2
        row = {"heads": heads, "kv_heads": kv, "head_dim": dim, "seq": seq, "dtype": str(dtype), "backends": {}}
        for bname, b in backends.items():
            if bname == "math" and on_gpu:
                continue  # the reference: never what training should get, and slow at seq 4096
            try:
                with sdpa_kernel([b]):
                    s = _timer(step, repeats, on_gpu)
                row["backends"][bname] = {"ms": round(s * 1e3, 3), "tflops": round(flops / s / 1e12, 1)}
            except RuntimeError as exc:
                row["backends"][bname] = {"error": str(exc).strip().splitlines()[0][:160]}
        with torch.profiler.profile() as prof:
            step()
            if on_gpu:
                torch.cuda.synchronize()
        ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and "backward" not in e.key
                      and e.key != "aten::scaled_dot_product_attention"})
        row["auto_ops"] = ops
        row["auto"] = next((b for b, op in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "efficient"),
                                            ("math", "math")) if any(op in o for o in ops)), None)
        out[name] = row
    return out


def matmul_ceiling(n: int, on_gpu: bool, repeats: int) -> dict:
    import torch

    dev, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    s = _timer(lambda: a @ b, repeats, on_gpu)
    return {"n": n, "dtype": str(dtype), "ms": round(s * 1e3, 3), "tflops": round(2 * n**3 / s / 1e12, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default="-", help="output path ('-': stdout)")
    p.add_argument("--dry-run", action="store_true", help="CPU: gloo, seq 128, matmul 256, 2 repeats")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        args.seq_len, args.matmul_n, args.repeats = min(args.seq_len, 128), min(args.matmul_n, 256), 2
    import torch

    on_gpu = torch.cuda.is_available()
    doc = {"device": torch.cuda.get_device_name() if on_gpu else "CPU", "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if on_gpu else None,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None}
    doc["collective"] = collective(on_gpu)
    doc["sdpa"] = sdpa(args.seq_len, SHAPES, on_gpu, args.repeats)
    doc["matmul"] = matmul_ceiling(args.matmul_n, on_gpu, args.repeats)
    text = json.dumps(doc, indent=2)
    if args.json == "-":
        print(text)
    else:
        Path(args.json).write_text(text + "\n")
    c = doc["collective"]
    print(f"preflight: {doc['device']} | torch {doc['torch']} cuda {doc['cuda']} | {c['backend']} all_reduce "
          f"{'ok' if c['ok'] else 'FAILED: ' + str(c['error'])} | matmul {doc['matmul']['n']}^3 "
          f"{doc['matmul']['tflops']} TFLOP/s", file=sys.stderr)
    for name, row in doc["sdpa"].items():
        times = ", ".join(f"{b} {r['ms']} ms" if "ms" in r else f"{b} n/a" for b, r in row["backends"].items())
        print(f"preflight: SDPA {name} (h{row['heads']}/kv{row['kv_heads']}/d{row['head_dim']}, seq {row['seq']}): "
              f"auto -> {row['auto']}; {times}", file=sys.stderr)
    return 0 if c["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
