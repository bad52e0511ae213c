"""Training throughput on one GPU: this project's megatron-core step vs Hugging Face transformers.

    python benchmarks/bench_throughput.py --model qwen2_1_5b --seq-len 4096 --micro-batch 1 --steps 20
    python benchmarks/bench_throughput.py --model qwen2_0_5b --seq-len 4096 --json out.json --record
    python benchmarks/bench_throughput.py --model qwen1_5_moe_a2_7b --layers 3 --seq-len 4096
    python benchmarks/bench_throughput.py --dry-run --json -        # CPU plumbing check, tiny preset, fp32

What is measured, in one process, one side after the other (never both resident on the GPU):

* **ours**: ``pretrain.build.build_train_module`` exactly as the trainer builds it for ``parallel=single``:
  megatron-core ``GPTModel`` (local spec, our ``SDPAttention`` or megatron's unfused attention), bf16 via
  ``Float16Module``, megatron DDP (fp32 gradient buffer), distributed optimizer (fp32 main weights, torch
  AdamW underneath: megatron-core without TransformerEngine/apex builds ``torch.optim.AdamW``; the job's
  ``optim.fused`` (auto: fused on CUDA) selects the fused kernel, ``--ours-adam unfused`` torch's default
  foreach kernels), grad clipping, LR schedule. One ``TrainModule.train_batch`` call = one timed step (forward, backward, optimizer).
* **peer** (``--peer hf``): transformers ``Qwen2ForCausalLM`` / ``Qwen2MoeForCausalLM`` built from the
  same shape (``hf_config_from_model``), holding the SAME initial weights (ours' weights converted with
  ``pretrain.models.hf.to_hf``), ``attn_implementation="sdpa"``, torch fused AdamW (same lr, betas, eps, weight
  decay with no decay on biases/norms, grad clip), the same token batch. ``--peer-precision master``
  (default) mirrors ours: bf16 weights and compute, fp32 master weights + gradients + AdamW states;
  ``amp``: fp32 weights + ``torch.autocast(bf16)`` (HF Trainer's bf16=True; note transformers' grouped_mm
  MoE experts are not autocast, so they run in fp32); ``bf16``: weights, grads and Adam states in bf16
  (less memory and optimizer work: not the same numerics). MoE: ``output_router_logits=True`` so the peer
  also computes a load-balancing loss; both sides report the cross-entropy alone.

Timing: ``--warmup`` unmeasured steps, then ``--steps`` steps, each bracketed by
``torch.cuda.synchronize()``; the figure is the MEDIAN step time. tokens/s = microbatches x micro-batch x
seq-len / median step time (every position counts, as in the trainer's Throughput callback).

    MFU = tokens/s x flops_per_token / peak_bf16_dense_flops

reported in two conventions side by side (``pretrain.models.decoder.flops.flops_per_token``; 6 x active matmul
weights incl. the output layer, embedding lookup excluded, plus attention): ``mfu`` (PaLM / nanotron /
torchtitan: 12 x layers x heads x head_dim x seq, causal masking NOT discounted) and ``mfu_causal``
(Megatron-LM's ``num_floating_point_operations``: half of that attention term), the same for both sides; and
``matmul_fraction``: achieved TFLOP/s (PaLM) over a bf16 matmul ceiling measured in the same run
(``--matmul-tflops``, from the GPU script's preflight). Compare with published figures in their convention. The peak is the vendor's DENSE
(no sparsity) BF16 tensor-core figure, from ``pretrain.plan.hardware.PEAK_BF16_DENSE_FLOPS`` (first matching substring of
``torch.cuda.get_device_name()``), or ``--peak-tflops``. For scale: an 8192^3 bf16 matmul reaches ~790-800
TFLOP/s on the H100 SXM / H200 of the device machine (~80% of 989), so ~0.8 is the practical MFU ceiling.

Peak memory is ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` for each side
(``memory_baseline_gib``: what was still allocated when that side started; ~0).

Besides timing, one extra untimed step of each side runs under ``torch.profiler`` and the attention
operators/kernels it hit are recorded (``attention_kernels``): on CUDA/bf16 with ``--attention sdpa``
expect ``aten::_scaled_dot_product_flash_attention`` (or ``..._cudnn_attention``) and flash/cuDNN kernels,
never ``..._attention_math``.

Knobs (each recorded in the JSON and the RESULTS.md row): ``--attention sdpa|local``, ``--sdpa-backend``
(both sides), ``--recompute none|selective|full`` (megatron ``recompute_granularity``; selective recomputes
``--recompute-modules``, default core_attn; full = uniform, 1 layer per unit; the HF peer gets gradient
checkpointing for full, nothing for selective), ``--compile`` (``torch.compile`` per transformer layer of
both sides; MoE: per attention block). Ours takes recompute, compile and the AdamW kernel from the job's
``trainer.recompute*``, ``trainer.compile`` and ``optim.fused``, exactly as the trainer does; ``--layers N`` (cut the layer count, e.g. for the 14B-parameter
Qwen1.5-MoE-A2.7B on one 80 GB GPU), ``--ours-adam``, ``--peer-precision``, ``--skip-ours``/``--peer none``.
``--record`` appends one row to benchmarks/RESULTS.md (``--record-to`` another file). ``--dry-run`` runs on
the CPU (CUDA hidden) in fp32 with the tiny preset (qwen2_tiny, or qwen2_moe_tiny for an MoE ``--model``),
seq <= 128, 3 steps (1 warm-up), and the peer: a plumbing check (MFU n/a), whose step-0 losses of the two
sides agree to ~1e-6 (same weights, same batch, fp32; dense: all 3 steps, i.e. the same optimizer too).
See benchmarks/README.md for the GPU procedure.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

from benchmarks import harness
from pretrain.plan.hardware import peak_bf16_flops

# Where the results go (flag / optional value / value): not part of the command that reproduces them.
OUTPUT_OPTIONS = {"--record": "", "--json": "?", "--record-to": "1"}
TINY_PRESETS = {"dense": "qwen2_tiny", "moe": "qwen2_moe_tiny"}
_ATTN_OP = re.compile(r"scaled_dot_product|flash|fmha|cudnn|sdpa|attention|baddbmm",
                      re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2_0_5b", help="conf/model preset (qwen2_0_5b, qwen2_1_5b, "
                   "qwen1_5_moe_a2_7b, qwen2_tiny, qwen2_moe_tiny, ...)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward/backward")
    p.add_argument("--microbatches", type=int, default=1, help="gradient-accumulation microbatches per step")
    p.add_argument("--steps", type=int, default=20, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (allocator, autotuning, compile)")
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many layers (memory)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="embedding rows for presets whose vocabulary comes from the tokenizer (tiny presets; "
                        "default 2048)")
    p.add_argument("--attention", choices=("sdpa", "local"), default="sdpa",
                   help="ours: torch SDPA (flash/cuDNN on GPU) or megatron's unfused DotProductAttention")
    p.add_argument("--sdpa-backend", choices=("auto", "flash", "cudnn", "efficient", "math"), default="auto",
                   help="restrict torch SDPA (both sides) to one backend via torch.nn.attention.sdpa_kernel; "
                        "auto: torch's own choice")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                   help="megatron activation recompute (recompute_granularity)")
    p.add_argument("--recompute-modules", default="core_attn",
                   help="selective recompute: comma-separated megatron recompute_modules")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer layer (both sides)")
    p.add_argument("--ours-adam", choices=("auto", "fused", "unfused"), default="auto",
                   help="ours: optim.fused (auto: the fused kernel on CUDA; unfused: torch's default, foreach on "
                        "CUDA, for-loop on CPU)")
    p.add_argument("--peer", choices=("hf", "none"), default="hf", help="hf: also run the transformers peer")
    p.add_argument("--skip-ours", action="store_true",
                   help="run the peer only (random HF init, no ratio): for peer-only knobs such as --peer-precision")
    p.add_argument("--peer-precision", choices=("master", "amp", "bf16"), default="master",
                   help="HF peer on GPU: bf16 model + fp32 master weights/grads/AdamW as ours (master), fp32 "
                        "weights + bf16 autocast (amp), or pure bf16 weights/grads/AdamW states (bf16)")
    p.add_argument("--peer-experts", default=None,
                   help="HF MoE experts_implementation (eager, grouped_mm, batched_mm); default: transformers'")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU (--dry-run --precision bf16 runs the GPU's bf16 code paths "
                        "on the CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense BF16 peak")
    p.add_argument("--matmul-tflops", type=float, default=None,
                   help="a bf16 matmul ceiling measured on this GPU (benchmarks/gpu/preflight.py): reported as "
                        "matmul_fraction = achieved TFLOP/s / this")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for ours' job (repeatable), e.g. trainer.cross_entropy=chunked")
    p.add_argument("--keep-preset", action="store_true",
                   help="with --dry-run: keep --model (the real shape: vocabulary, tied embeddings) instead of the "
                        "tiny preset; cut it with --layers")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-profile", action="store_true", help="skip the extra profiled step (attention kernels)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the results as JSON to PATH ('-' or no PATH: stdout, and no table)")
    p.add_argument("--record", action="store_true", help="append a row to benchmarks/RESULTS.md")
    p.add_argument("--record-to", type=Path, default=harness.RESULTS_MD, metavar="MD",
                   help="with --record: the markdown file to append to (the GPU script collects rows in $OUT)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, fp32, tiny preset, 3 steps (1 warm-up): checks the plumbing")
    args = p.parse_args(argv)
    args.argv = harness.argv_of(argv)
    if args.dry_run:
        if not args.keep_preset:
            args.model = TINY_PRESETS["moe" if "moe" in args.model else "dense"]
        args.seq_len = min(args.seq_len, 128)
        args.micro_batch = min(args.micro_batch, 2)
        args.steps, args.warmup = 2, 1
    if args.skip_ours and args.peer == "none":
        p.error("--skip-ours with --peer none leaves nothing to run")
    for name in ("seq_len", "micro_batch", "microbatches", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# --------------------------------------------------------------------------------------------------
# Job config (Hydra, as the trainer composes it)
# --------------------------------------------------------------------------------------------------
def compose_job(args: argparse.Namespace, *, bf16: bool):
    overrides = [
        f"model={args.model}", "parallel=single",
        f"trainer.precision={'bf16' if bf16 else 'fp32'}",
        f"model.attention_backend={args.attention}",
        f"data.seq_len={args.seq_len}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.micro_batch * args.microbatches}",
        f"trainer.steps={args.warmup + args.steps + 1}",
        f"trainer.seed={args.seed}",
        "trainer.wandb.mode=disabled", "trainer.eval_every=0",
        # The knobs under test, as the trainer takes them.
        f"trainer.recompute={args.recompute}",
        f"trainer.recompute_modules=[{args.recompute_modules}]",
        f"trainer.compile={str(args.compile).lower()}",
        f"optim.fused={ {'auto': 'null', 'fused': 'true', 'unfused': 'false'}[args.ours_adam] }",
        # No warm-up, and a decay so long that the LR stays at its peak: the peer uses a constant LR.
        "optim.warmup_steps=0", "optim.decay_steps=1000000000",
        *args.override,
    ]

    def model_changes(model) -> dict:
        changes = {}
        if args.layers is not None:
            changes["num_layers"] = args.layers
        if model.vocab_size is None:
            changes["vocab_size"] = args.vocab_size or 2048
        elif args.vocab_size is not None:
            changes["vocab_size"] = args.vocab_size
        if args.seq_len > model.max_seq_len:
            changes["max_seq_len"] = args.seq_len
        return changes

    return harness.job(overrides, model=model_changes)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()



def _measure(step, args, result: dict, counters_before) -> None:
    """Time ``step`` (warm-up excluded) and fill ``result``: the same measurement for ours and the peer."""
    with _sdpa_backend(args.sdpa_backend):
        losses, times = _timed_steps(step, args.warmup, args.steps)
        if args.compile:
            result["compile_stats"] = _diff(_compile_counters(), counters_before)
        result.update(_figures(times, args), losses=losses, loss_step0=losses[0], peak_memory_gib=_peak_memory())
        if not args.no_profile:
            result["attention_kernels"] = _profiled_attention_ops(step)
            result["sdpa_backend_used"] = sdpa_backend_used(result["attention_kernels"])

def _timed_steps(step, n_warmup: int, n_steps: int) -> tuple[list[float], list[float]]:
    """Run ``step()`` (returns the loss) warm-up + measured times; (losses of every step, measured seconds)."""
    losses, times = [], []
    for i in range(n_warmup + n_steps):
        _sync()
        t0 = time.perf_counter()
        losses.append(step())
        _sync()
        if i >= n_warmup:
            times.append(time.perf_counter() - t0)
    return losses, times


def _profiled_attention_ops(step) -> list[str]:
    """Names of the attention operators and kernels one step runs (CPU ops + CUDA kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        _sync()
    names = sorted({e.key for e in prof.key_averages() if _ATTN_OP.search(e.key)})
    return [n[:160] for n in names][:40]


def _sdpa_backend(name: str):
    """A context restricting ``F.scaled_dot_product_attention`` to one backend (``auto``: torch's choice)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory_start() -> float | None:
    import torch

    _free_memory()
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _peak_memory() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _recorded_error(exc: BaseException) -> str | None:
    """Errors recorded in the result (the run goes on to the other side): out of memory, and no SDPA kernel
    for a forced ``--sdpa-backend``. Anything else propagates."""
    import torch

    text = str(exc)
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return f"OOM: {first}"
    if "No available kernel" in text or "No viable backend" in text:
        return f"no SDPA kernel: {first}"
    return None


def _record_error(exc: BaseException, result: dict) -> None:
    """Put a :func:`_recorded_error` in ``result`` (with the peak memory); re-raise any other error."""
    error = _recorded_error(exc)
    if error is None:
        raise exc
    result.update(error=error, peak_memory_gib=_peak_memory())


def make_batch(job, args: argparse.Namespace, device) -> list[dict]:
    """Random tokens, ``args.microbatches`` microbatches in the trainer's format, already on ``device``.

    labels[t] = tokens[t + 1]; the last position has no target (loss_mask 0), which is exactly the
    positions the HF peer's internally shifted loss covers for ``labels=tokens``.
    """
    import torch

    g = torch.Generator().manual_seed(args.seed)
    b, s = args.micro_batch, args.seq_len
    batches = []
    for _ in range(args.microbatches):
        tokens = torch.randint(0, job.model.vocab_size, (b, s), generator=g)
        labels = torch.roll(tokens, -1, dims=1)
        loss_mask = torch.ones(b, s, dtype=torch.float32)
        loss_mask[:, -1] = 0
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
        batches.append({k: v.to(device) for k, v in dict(tokens=tokens, labels=labels, loss_mask=loss_mask,
                                                         position_ids=position_ids).items()})
    return batches


def _compile_counters() -> dict:
    """dynamo's global counters (graph breaks, graphs, recompilations), to diff around one side's run."""
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
            "frames_ok": counters["frames"].get("ok", 0),
            "break_reasons": dict(counters["graph_break"])}


def _diff(after: dict, before: dict) -> dict:
    out = {k: after[k] - before.get(k, 0) for k in after if k != "break_reasons"}
    reasons = {r: n - before["break_reasons"].get(r, 0) for r, n in after["break_reasons"].items()}
    top = sorted(((n, r) for r, n in reasons.items() if n > 0), reverse=True)[:5]
    out["top_break_reasons"] = [f"{n}x {r[:200]}" for n, r in top]
    return out


def run_ours(job, args: argparse.Namespace, batch: list[dict], *, want_hf_weights: bool) -> tuple[dict, dict | None]:
    """Build ours as the trainer does, time it, free it. Returns (result, initial weights in HF naming)."""
    from pretrain.build import build_train_module
    from pretrain.models.hf import Layout, local_state_dict, to_hf, unwrap_chunk

    result: dict = {"name": "ours", "impl": "megatron-core GPTModel + DDP + distributed optimizer",
                    "memory_baseline_gib": _memory_start()}
    hf_weights = module = chunk = gpt = inner_opt = step = None
    try:
        # trainer.recompute*, trainer.compile and optim.fused are in the job (compose_job): built as the trainer does.
        module = build_train_module(job, job.model.vocab_size, init_weights=False)
        (chunk,) = module.chunks
        gpt = unwrap_chunk(chunk)
        inner_opt = getattr(module.optimizer, "optimizer", None)
        result["optimizer"] = _describe_optimizer(inner_opt)
        result["config"] = {k: getattr(module.config, k) for k in
                            ("bf16", "recompute_granularity", "recompute_method", "recompute_num_layers",
                             "recompute_modules", "params_dtype")}
        result["config"]["params_dtype"] = str(result["config"]["params_dtype"])
        result["core_attention"] = type(gpt.decoder.layers[0].self_attention.core_attention).__name__
        if want_hf_weights:  # the initial weights, before any step, for the peer
            sd = {k: v.detach().to("cpu", copy=True) for k, v in local_state_dict(chunk).items()}
            hf_weights = to_hf([(Layout(), sd)], job.model, hf_vocab_size=job.model.vocab_size)
            del sd
        if args.compile:  # compiled lazily: tracing happens in the warm-up steps
            compiled = sum(getattr(m, "_compiled_call_impl", None) is not None for m in gpt.modules())
            result["compiled"] = f"{compiled} x {'attention block' if job.model.is_moe else 'transformer layer'}"
        counters_before = _compile_counters() if args.compile else None

        def step() -> float:
            return module.train_batch(batch).loss

        _measure(step, args, result, counters_before)
    except Exception as exc:  # noqa: BLE001 - record OOM and carry on
        _record_error(exc, result)
    finally:
        if module is not None:
            _teardown(module)
        module = chunk = gpt = inner_opt = step = None  # noqa: F841 - drop every reference, then free
        if args.compile:
            import torch._dynamo

            torch._dynamo.reset()  # compiled code holds the layers it was traced from
        _free_memory()
        # Nothing of ours may stay allocated while the peer is measured.
        from megatron.core.models.gpt import GPTModel

        result["freed"] = not any(isinstance(o, GPTModel) for o in gc.get_objects())
    return result, hf_weights


def _teardown(module) -> None:
    """Make ours collectable before the peer runs (checked: no GPTModel survives ``run_ours``).

    Two reference cycles pass through C++ autograd objects, which Python's gc cannot see, and kept the whole
    model, its gradient buffer and the optimizer state alive (on the GPU, under the peer's measurement):
    megatron DDP keeps each parameter's AccumulateGrad node (``grad_accs``) with a hook that refers back to
    the DDP module; and MoE token dispatchers keep tensors of the last forward (``probs``...) whose graph
    reaches those nodes.
    """
    import torch

    def drop_graph_tensors(obj) -> None:
        for key, value in list(vars(obj).items()):
            if torch.is_tensor(value) and value.grad_fn is not None:
                setattr(obj, key, None)

    for chunk in module.chunks:
        accs = getattr(chunk, "grad_accs", None)
        if accs is not None:
            accs.clear()
        for sub in chunk.modules():
            drop_graph_tensors(sub)
            for value in vars(sub).values():  # helpers that are not modules (token dispatchers)
                if hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.Tensor, type)):
                    drop_graph_tensors(value)
    for name in ("no_sync_func", "grad_scale_func", "finalize_model_grads_func"):
        setattr(module.config, name, None)


def _describe_optimizer(opt) -> str:
    if opt is None:
        return "?"
    d = opt.param_groups[0]  # what torch reads at each step (optim.fused sets it per group)
    if d.get("fused"):
        kind = "fused"
    elif d.get("foreach"):
        kind = "foreach"
    elif d.get("foreach") is None:
        kind = "torch default: foreach on CUDA, for-loop on CPU"
    else:
        kind = "for-loop"
    return f"{type(opt).__module__}.{type(opt).__name__} ({kind})"


def _kernels(job) -> dict:
    """Ours' kernel knobs as this machine resolves them (trainer.fused_swiglu / cross_entropy / moe_grouped_gemm)."""
    from pretrain.models.decoder.model import resolve_kernels

    return dict(resolve_kernels(job.trainer), foreach_grad_norm=job.optim.foreach_grad_norm,
                cross_entropy_chunk=job.trainer.cross_entropy_chunk)


def sdpa_backend_used(kernels: list[str]) -> str | None:
    """The SDPA backend a profiled step ran, from its operator names (None: not profiled or no SDPA op)."""
    names = " ".join(kernels)
    for backend, op in (("cudnn", "_scaled_dot_product_cudnn_attention"),
                        ("flash", "_scaled_dot_product_flash_attention"),
                        ("efficient", "_scaled_dot_product_efficient_attention"),
                        ("math", "_scaled_dot_product_attention_math")):
        if op in names:
            return backend + (" (CPU kernel)" if "for_cpu" in names else "")
    return None


def _figures(times: list[float], args) -> dict:
    med = statistics.median(times)
    tokens = args.microbatches * args.micro_batch * args.seq_len
    return {"step_s_median": med, "step_s_all": times, "tokens_per_step": tokens, "tokens_per_s": tokens / med}


# --------------------------------------------------------------------------------------------------
# The Hugging Face peer
# --------------------------------------------------------------------------------------------------
class _MasterWeights:
    """fp32 master weights, gradients and AdamW for a bf16 model: what megatron's Float16Module + distributed
    optimizer do for ours (bf16 weights and compute, fp32 gradient copy, fp32 update, copy back)."""

    def __init__(self, params: list, make_optimizer) -> None:
        import torch

        self.params = params
        self.masters = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in params]
        for m in self.masters:
            m.grad = torch.zeros_like(m)
        self.optimizer = make_optimizer(self.masters)

    def step(self, clip: float) -> None:
        import torch

        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):
            torch._foreach_copy_([m.grad for m in self.masters], grads)
        else:  # a parameter without gradient this step (an MoE expert no token reached): zero
            for m, g in zip(self.masters, grads):
                m.grad.copy_(g) if g is not None else m.grad.zero_()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, clip, foreach=True)
        self.optimizer.step()
        torch._foreach_copy_([p.data for p in self.params], [m.detach() for m in self.masters])
        for p in self.params:
            p.grad = None


PEER_PRECISION = {
    "master": "bf16 weights/compute, fp32 master weights + grads + AdamW (as ours)",
    "amp": "fp32 weights + bf16 autocast",
    "bf16": "pure bf16 weights, grads and AdamW states",
}


def run_peer(job, args: argparse.Namespace, batch: list[dict], weights: dict | None) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from pretrain.models.decoder.compile import compile_layers
    from pretrain.models.hf import hf_config_from_model, load_hf_module_weights

    on_gpu = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    mode = args.peer_precision
    bf16 = job.trainer.precision == "bf16"
    # fp32 (the CPU dry run): fp32 everywhere, but the same code path (an fp32 "master" copy in master mode).
    dtype = torch.bfloat16 if bf16 and mode in ("master", "bf16") else torch.float32
    amp = bf16 and mode == "amp"
    config = hf_config_from_model(job.model, vocab_size=job.model.vocab_size)
    moe = job.model.is_moe
    if moe:
        config.output_router_logits = True  # the peer computes a load-balancing loss too, as ours does
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if moe and args.peer_experts:
        kwargs["experts_implementation"] = args.peer_experts
    precision = PEER_PRECISION[mode] if bf16 else f"fp32 ({mode} code path)"
    result: dict = {"name": "peer", "impl": f"transformers {transformers.__version__} "
                    f"{'Qwen2MoeForCausalLM' if moe else 'Qwen2ForCausalLM'} (sdpa; {precision})",
                    "memory_baseline_gib": _memory_start()}
    model = step = None
    try:
        torch.manual_seed(args.seed)
        with dev:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        if weights is not None:
            load_hf_module_weights(model, weights)
            result["weights"] = "same as ours"
        model.train()
        result["attn_implementation"] = model.config._attn_implementation
        if moe:
            result["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
        if args.recompute == "full":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        result["recompute"] = "full (gradient checkpointing)" if args.recompute == "full" else "none"
        if args.compile:
            # The scope trainer.compile gives ours: per decoder layer (MoE: per attention block).
            result["compiled"] = compile_layers(model.model.layers, moe=moe, attention="self_attn")
        autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        step = _peer_step(model, batch, job.optim, master_weights=mode == "master", fused=on_gpu, autocast=autocast,
                          aux_loss_coef=config.router_aux_loss_coef if moe else None)
        result["optimizer"] = f"torch.optim.AdamW ({'fused' if on_gpu else 'foreach'})"
        counters_before = _compile_counters() if args.compile else None
        _measure(step, args, result, counters_before)
    except Exception as exc:  # noqa: BLE001 - record OOM and carry on
        _record_error(exc, result)
    finally:
        model = step = None  # noqa: F841 - the step holds the optimizer and master weights: all freed
        _free_memory()
    return result


def _peer_step(model, batch: list[dict], o, *, master_weights: bool, fused: bool, autocast, aux_loss_coef):
    """The peer's training step, ours' optimizer settings (``o``: the job's ``optim``): torch AdamW with the same
    lr, betas, eps, weight decay (none on biases and norms, megatron's default) and grad clip, on fp32 master
    weights (``master_weights``) or on the model's own. Returns step() -> the cross-entropy (MoE: without the
    load-balancing loss, ``aux_loss_coef`` x ``aux_loss``, as ours reports it)."""
    import torch

    params = list(model.parameters())  # tied embedding counted once

    def make_optimizer(ps):
        return torch.optim.AdamW([{"params": [p for p in ps if p.ndim >= 2], "weight_decay": o.weight_decay},
                                  {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}],
                                 lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 **({"fused": True} if fused else {"foreach": True}))

    master = _MasterWeights(params, make_optimizer) if master_weights else None
    opt = None if master_weights else make_optimizer(params)

    def step() -> float:
        ce_total = 0.0
        for mb in batch:
            with autocast():
                out = model(input_ids=mb["tokens"], labels=mb["tokens"])
            (out.loss / len(batch)).backward()
            ce = out.loss.detach().float()
            if aux_loss_coef is not None:
                ce = ce - aux_loss_coef * out.aux_loss.detach().float()
            ce_total += ce / len(batch)
        if master is not None:
            master.step(o.clip_grad)
        else:
            if o.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, o.clip_grad, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(ce_total)

    return step


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    """``--peak-tflops``, else the GPU's dense BF16 peak (``pretrain.plan.hardware``)."""
    return override_tflops * 1e12 if override_tflops is not None else peak_bf16_flops(device_name)


def _add_mfu(side: dict, fpt: float, fpt_causal: float, peak: float | None, matmul: float | None = None) -> None:
    """MFU in both conventions (PaLM: ``mfu``; Megatron-LM, causal half of attention: ``mfu_causal``) and the
    fraction of the measured matmul ceiling (PaLM FLOPs)."""
    if "tokens_per_s" not in side:
        return
    side["tflops_per_s"] = side["tokens_per_s"] * fpt / 1e12
    side["tflops_per_s_causal"] = side["tokens_per_s"] * fpt_causal / 1e12
    side["mfu"] = side["tokens_per_s"] * fpt / peak if peak else None
    side["mfu_causal"] = side["tokens_per_s"] * fpt_causal / peak if peak else None
    side["matmul_fraction"] = side["tflops_per_s"] * 1e12 / matmul if matmul else None


def _fmt(v, spec: str, na: str = "n/a") -> str:
    return na if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def print_table(doc: dict, out=sys.stdout) -> None:
    c, m = doc["config"], doc["machine"]
    peak = doc["peak_bf16_flops"]
    print(f"bench_throughput: {c['model']} ({c['layers']} layers) | seq {c['seq_len']} x micro-batch "
          f"{c['micro_batch']} x {c['microbatches']} microbatch(es) = {c['tokens_per_step']} tokens/step | "
          f"{c['precision']} | attention {c['attention']} (SDPA backend {c.get('sdpa_backend', 'auto')}) | "
          f"recompute {c['recompute']} | "
          f"compile {'on' if c['compile'] else 'off'}", file=out)
    print(f"device: {m['device']} (peak bf16 dense: {_fmt(peak and peak / 1e12, '.0f')} TFLOP/s) | "
          f"median of {c['steps']} steps after {c['warmup']} warm-up | flops/token {doc['flops_per_token']:.4g} | "
          f"params {doc['params']['total'] / 1e6:.1f}M ({doc['params']['active'] / 1e6:.1f}M active)", file=out)
    for side in doc["results"].values():
        if side.get("freed") is False:
            print("WARNING: ours' model was still alive while the peer ran (its memory counts in the peer's)",
                  file=out)
    print(f"{'side':5s} {'tokens/s':>11s} {'step ms':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'causal':>6s} {'of mm':>6s} "
          f"{'peak GiB':>9s} {'loss[0]':>10s} {'loss[-1]':>10s}  impl", file=out)
    for side in doc["results"].values():
        if "error" in side:
            print(f"{side['name']:5s} {side['error']}  ({side['impl']})", file=out)
            continue
        print(f"{side['name']:5s} {side['tokens_per_s']:11.1f} {side['step_s_median'] * 1e3:9.2f} "
              f"{side['tflops_per_s']:8.2f} {_fmt(side['mfu'], '6.1%'):>6s} {_fmt(side.get('mfu_causal'), '6.1%'):>6s} "
              f"{_fmt(side.get('matmul_fraction'), '6.1%'):>6s} "
              f"{_fmt(side['peak_memory_gib'], '9.2f'):>9s} {side['loss_step0']:10.6f} {side['losses'][-1]:10.6f}  "
              f"{side['impl']}; {side.get('optimizer', '')}", file=out)
    ratio = doc.get("ratio_tokens_per_s_ours_over_peer")
    if ratio is not None:
        print(f"ratio ours/peer tokens/s: {ratio:.3f}   (> 1: ours is faster); step-0 loss diff "
              f"{doc['loss_step0_abs_diff']:.2e}", file=out)
    for side in doc["results"].values():
        if side.get("compile_stats"):
            stats = {k: v for k, v in side["compile_stats"].items() if k != "top_break_reasons"}
            print(f"{side['name']} torch.compile: {stats}", file=out)
        shown = [k[:80] for k in side.get("attention_kernels", [])
                 if not k.startswith("autograd::") and not k.endswith("Backward0")]
        if shown:
            print(f"{side['name']} attention ops/kernels: {', '.join(shown[:5])}", file=out)


def record_row(doc: dict, path: Path = harness.RESULTS_MD) -> None:
    """Append one row to RESULTS.md, under this benchmark's header; append only (never rewrites the file).

    If the file's last section is another benchmark's, a new copy of our header and table head goes first.
    """
    header = "## bench_throughput: training step tokens/s, MFU, peak memory (ours vs HF transformers)"
    columns = ["date (UTC)", "device", "command", "ours tok/s", "ours MFU", "ours MFU causal", "ours of matmul ceiling",
               "ours peak GiB", "peer tok/s", "peer MFU", "peer MFU causal", "peer peak GiB", "ours/peer", "notes"]
    r = doc["results"]
    ours, peer = r.get("ours", {}), r.get("peer", {})

    def cell(side, key, spec):
        if not side:
            return "-"
        if "error" in side:
            return side["error"].split(":")[0]
        return _fmt(side.get(key), spec)

    c = doc["config"]
    notes = f"torch {doc['machine']['torch']}, transformers {doc['machine']['transformers']}"
    if peer:
        notes += f", peer precision {c.get('peer_precision')}"
    if peer and "experts_implementation" in peer:
        notes += f", HF experts {peer['experts_implementation']}"
    if c["dry_run"]:
        notes += f", DRY RUN (CPU {c.get('precision')})"
    figures = [cell(ours, key, spec) for key, spec in (("tokens_per_s", ".0f"), ("mfu", ".1%"), ("mfu_causal", ".1%"),
                                                         ("matmul_fraction", ".1%"), ("peak_memory_gib", ".1f"))]
    figures += [cell(peer, key, spec) for key, spec in (("tokens_per_s", ".0f"), ("mfu", ".1%"), ("mfu_causal", ".1%"),
                                                         ("peak_memory_gib", ".1f"))]
    cells = [doc["date"][:16].replace("T", " "), doc["machine"]["device"], f"`{doc['command']}`", *figures,
             _fmt(doc.get("ratio_tokens_per_s_ours_over_peer"), ".2f", "-"), notes]
    opening = "\n".join(["", header, "", "Appended by `benchmarks/bench_throughput.py --record` (see benchmarks/README.md).",
                         "", *harness.markdown_table(columns, []), ""])
    harness.append_results(harness.markdown_row(cells) + "\n", path, section=header, opening=opening)


# --------------------------------------------------------------------------------------------------
def _config_doc(args: argparse.Namespace, job, *, bf16: bool) -> dict:
    return {
        "model": job.model.name, "layers": job.model.num_layers, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "microbatches": args.microbatches,
        "tokens_per_step": args.microbatches * args.micro_batch * args.seq_len,
        "steps": args.steps, "warmup": args.warmup, "vocab_size": job.model.vocab_size,
        "precision": job.trainer.precision, "attention": args.attention, "recompute": args.recompute,
        "recompute_modules": args.recompute_modules if args.recompute == "selective" else None,
        "compile": args.compile, "ours_adam": args.ours_adam, "peer": args.peer,
        "sdpa_backend": args.sdpa_backend,
        "peer_precision": args.peer_precision if bf16 else "fp32", "dry_run": args.dry_run,
        "overrides": args.override,
        "kernels": _kernels(job),
    }


def _machine_doc(dev_name: str | None) -> dict:
    """The device (None: the CPU) and the software that ran."""
    import megatron.core
    import torch
    import transformers

    on_gpu = dev_name is not None
    return {
        "device": dev_name or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "?"), "python": platform.python_version(),
        "sdp_backends": ({"flash": torch.backends.cuda.flash_sdp_enabled(),
                          "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                          "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                          "math": torch.backends.cuda.math_sdp_enabled()} if on_gpu else None),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the dry run is a CPU run
    import torch

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|core_attn).*")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.dry_run:
        print("bench_throughput: no CUDA device; use --dry-run for the CPU plumbing check", file=sys.stderr)
        return 2
    from parallel.mesh import destroy_distributed, device, init_distributed
    from pretrain.models.decoder.flops import flops_per_token, param_count

    bf16 = args.precision == "bf16" or (args.precision == "auto" and on_gpu)
    job = compose_job(args, bf16=bf16)
    init_distributed(job.parallel, seed=args.seed)  # a 1-rank group: megatron-core's layers query it
    try:
        dev_name = torch.cuda.get_device_name() if on_gpu else None
        batch = make_batch(job, args, device())
        results, weights = {}, None
        if not args.skip_ours:
            results["ours"], weights = run_ours(job, args, batch, want_hf_weights=args.peer == "hf")
        if args.peer == "hf":
            results["peer"] = run_peer(job, args, batch, weights)
        del weights
    finally:
        destroy_distributed()
    fpt = flops_per_token(job.model, args.seq_len, job.model.vocab_size)
    fpt_causal = flops_per_token(job.model, args.seq_len, job.model.vocab_size, causal=True)
    peak = peak_flops(dev_name, args.peak_tflops) if on_gpu else None
    matmul = args.matmul_tflops * 1e12 if args.matmul_tflops else None
    for side in results.values():
        _add_mfu(side, fpt, fpt_causal, peak, matmul)
    count = param_count(job.model, job.model.vocab_size)
    doc = {
        "benchmark": "bench_throughput",
        "command": harness.command_line("bench_throughput.py", args.argv, OUTPUT_OPTIONS),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": _config_doc(args, job, bf16=bf16),
        "machine": _machine_doc(dev_name),
        "flops_per_token": fpt,
        "flops_per_token_causal": fpt_causal,
        "flops_formula": "6 * active matmul params (incl. output layer) + 12 * layers * heads * head_dim * seq; "
                         "causal (Megatron-LM): 6 * ... * seq",
        "peak_bf16_flops": peak,
        "matmul_ceiling_flops": matmul,
        "params": {"total": count.total, "active": count.active},
        "results": results,
    }
    ours, peer = results.get("ours", {}), results.get("peer", {})
    if "tokens_per_s" in ours and "tokens_per_s" in peer:
        doc["ratio_tokens_per_s_ours_over_peer"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        doc["loss_step0_abs_diff"] = abs(ours["loss_step0"] - peer["loss_step0"])
    harness.emit(doc, args.json, lambda: print_table(doc))
    if args.record:
        record_row(doc, args.record_to)
    return 1 if any("error" in side for side in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
