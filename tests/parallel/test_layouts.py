"""Every parallel layout trains like one process: same weights, same global batch, same 3 optimizer steps.

Each layout loads the weights of one tiny random Hugging Face model (``model.init_from``), runs 3 steps of
``build_train_module(...).train_batch`` on the same fixed global batch, and is compared with a single
process running the same job: the loss, gradient norm and learning rate of every step, and every weight
after the last step (exported to HF layout with ``pretrain.models.hf.to_hf``, so shards of any layout compare
against the same dict). Context-parallel layouts (cp) feed each rank 2 of 2 × cp chunks of every sequence
and must match the same way. fp32 layouts must match within 1e-5; bf16 layouts are compared against a bf16
single process with bf16 tolerances and checked for fp32 master weights and fp32 gradient reduction.

Cost control (2 CPU cores): the single-process references run once per module, all layouts of one world
size share one ``run_distributed`` call (megatron's parallel state is rebuilt between them), and the
model is 4 layers of width 64 on 32-token sequences.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from parallel.testing import have_deepspeed, run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from qwen2_tiny_hf import build_tiny_hf  # noqa: E402

SEQ, GBS, MBS, STEPS = 32, 8, 2, 3
LR = 1e-3  # large enough that 3 Adam steps move every weight by ~1e-3, far above the 1e-5 tolerance
# Adam divides by sqrt(v) + eps, so a rounding difference dg in one gradient element (a different
# summation order: ~1e-9 here) moves that weight by up to LR * dg / eps. With Qwen's eps = 1e-8 that is
# ~1e-4 for elements whose gradient is ~eps; eps = 1e-6 bounds it by ~1e-6, well inside the tolerance.
ADAM_EPS = 1e-6
FP32_TOL = 1e-5
Z_LOSS = 0.05  # large enough to move the grad norm by ~25%: a z-loss gradient off by 2x fails by far
# Weights after 3 steps, per case where FP32_TOL cannot be promised. moe-tp2-sp: one element of the input
# embedding (0.28431, a row only a few tokens of the batch touch) differs by 1.59e-5, the same value with 1 or 2
# torch threads and at the last landed commit: the TP+SP reduction order itself, not the machine. Such a row's
# gradient can sit near Adam's eps, where the update's sensitivity to a gradient's rounding peaks (lr / (4 eps)
# = 250x here); every other tensor of that case is within 3e-6, and its losses and grad norms within 1e-5.
WEIGHT_TOL = {"moe-tp2-sp": 2e-5}
BF16_LOSS_TOL = 2e-2  # bf16 has 8 mantissa bits: losses of ~6 agree to ~0.5% between reduction orders

# name -> (model, parallel layout, precision, world size). "poison" cases run a NaN step between the
# steps (trainer.inject_nan_steps) that must be skipped without a trace.
CASES: dict[str, tuple[str, dict, str, int]] = {
    # 2 ranks
    "tp2": ("dense", dict(tp=2), "fp32", 2),
    "tp2-sp": ("dense", dict(tp=2, sequence_parallel=True), "fp32", 2),
    "pp2": ("dense", dict(pp=2), "fp32", 2),
    "pp2-vpp2": ("dense", dict(pp=2, vpp=2), "fp32", 2),
    "dp2-zero0": ("dense", dict(zero=0), "fp32", 2),
    "dp2-zero1": ("dense", dict(zero=1), "fp32", 2),
    "ep2-dp2": ("moe", dict(ep=2), "fp32", 2),
    "ds-zero2": ("dense", dict(zero=2), "fp32", 2),
    "ds-zero3": ("dense", dict(zero=3), "fp32", 2),
    "ds-zero2-offload": ("dense", dict(zero=2, offload_optimizer=True), "fp32", 2),
    "ds-zero3-poison": ("dense", dict(zero=3), "fp32", 2),
    "ds-zero3-tied": ("tied", dict(zero=3), "fp32", 2),
    "ds-zero2-moe": ("moe", dict(zero=2), "fp32", 2),
    "pp2-tied": ("tied", dict(pp=2), "fp32", 2),
    "bf16-tp2": ("dense", dict(tp=2), "bf16", 2),
    "bf16-dp2-zero1": ("dense", dict(zero=1), "bf16", 2),
    "bf16-ds-zero2": ("dense", dict(zero=2), "bf16", 2),
    "cp2": ("dense", dict(cp=2), "fp32", 2),
    "ep2-cp2": ("moe", dict(ep=2, cp=2), "fp32", 2),
    "bf16-cp2": ("dense", dict(cp=2), "bf16", 2),
    # MoE under tp trains only with sequence parallel (megatron-core refuses tp without sp; so does
    # validate_job). These prove the aux/z-loss coefficients' tp factor (transformer_config).
    "moe-tp2-sp": ("moe", dict(tp=2, sequence_parallel=True), "fp32", 2),  # experts tp-sharded (etp = tp)
    # 4 ranks
    "tp2-pp2": ("dense", dict(tp=2, pp=2), "fp32", 4),
    "ep2-dp4": ("moe", dict(ep=2), "fp32", 4),
    "tp2-dp2-zero1": ("dense", dict(tp=2, zero=1), "fp32", 4),
    "tp2-sp-cp2": ("dense", dict(tp=2, cp=2, sequence_parallel=True), "fp32", 4),
    "cp2-dp2": ("dense", dict(cp=2, zero=1), "fp32", 4),
    "pp2-cp2": ("dense", dict(pp=2, cp=2), "fp32", 4),
    "moe-tp2-sp-ep2": ("moe", dict(tp=2, sequence_parallel=True, ep=2, etp=1), "fp32", 4),  # whole experts
    "moez-tp2-sp-cp2": ("moez", dict(tp=2, sequence_parallel=True, cp=2), "fp32", 4),  # router tokens in 4 shards
    # Qwen3 family (QK-norm, no QKV bias, head_dim != hidden / heads; MoE: normalised top-k, no shared expert)
    "qwen3-tp2": ("qwen3", dict(tp=2), "fp32", 2),
    "qwen3-pp2": ("qwen3", dict(pp=2), "fp32", 2),
    "qwen3_moe-ep2": ("qwen3_moe", dict(ep=2), "fp32", 2),
    "qwen3_moe-tp2-sp": ("qwen3_moe", dict(tp=2, sequence_parallel=True), "fp32", 2),
}
REFERENCES = {("dense", "fp32"), ("dense", "bf16"), ("moe", "fp32"), ("moez", "fp32"), ("tied", "fp32"),
              ("qwen3", "fp32"), ("qwen3_moe", "fp32")}
# The models: "dense" Qwen2 (untied, like 7B/72B), "tied" (input and output embedding shared, like
# 0.5B/1.5B), "moe" Qwen2-MoE (4 experts, top-2, shared expert), "moez" the same weights trained with a
# router z-loss (coefficient Z_LOSS; Qwen2-MoE has none) so that its gradient scaling is checked too;
# "qwen3" (tied) and "qwen3_moe" the tiny Qwen3 / Qwen3-MoE, whose load balancing is per micro-batch here
# (the HF config's default): the global-batch scope sums counts over a step's micro-batches so far, which
# group different samples under different dp sizes (tests/models/test_global_aux_loss.py proves it).


# --------------------------------------------------------------------------------------------------
# Inside the ranks
# --------------------------------------------------------------------------------------------------
def _global_batch(vocab: int) -> list[dict[str, torch.Tensor]]:
    """STEPS global batches of GBS samples, fixed by a seed: random tokens, a quarter of the loss masked
    (so ranks count different numbers of tokens and the per-token weighting across ranks matters)."""
    g = torch.Generator().manual_seed(1234)
    samples = []
    for _ in range(STEPS * GBS):
        seq = torch.randint(0, vocab, (SEQ + 1,), generator=g)
        samples.append({
            "tokens": seq[:-1].clone(),
            "labels": seq[1:].clone(),
            "loss_mask": (torch.rand(SEQ, generator=g) > 0.25).float(),
            "position_ids": torch.arange(SEQ),
        })
    return samples


def _job(hf_dir: Path, layout: dict, precision: str, poison: bool, z_loss: float | None = None):
    from pretrain.config import DataConfig, JobConfig, OptimConfig, TrainerConfig, WandbConfig
    from pretrain.models.hf import HFCheckpoint, model_config_from_hf
    from parallel.config import ParallelConfig

    model = model_config_from_hf(HFCheckpoint(hf_dir).config, name="tiny")
    return JobConfig(
        model=dataclasses.replace(model, init_from=str(hf_dir), moe_z_loss_coeff=z_loss),
        data=DataConfig(seq_len=SEQ),
        parallel=ParallelConfig(**layout),
        optim=OptimConfig(lr=LR, eps=ADAM_EPS, warmup_steps=1, weight_decay=0.1, clip_grad=1.0),
        trainer=TrainerConfig(steps=STEPS, micro_batch_size=MBS, global_batch_size=GBS, precision=precision,
                              inject_nan_steps=[2] if poison else [], wandb=WandbConfig(mode="disabled")),
    )


def _precision_report(module) -> dict:
    """Dtypes of what the optimizer steps (master weights) and of the gradients that get reduced."""
    if hasattr(module, "engine"):  # DeepSpeed: fp32 partitions in the wrapped optimizer
        opt = module.engine.optimizer
        masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat")
        params = list(module.engine.module.parameters())
        held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() for p in params)
        return {"master": sorted({str(p.dtype) for p in masters}), "reduce": [str(opt.communication_data_type)],
                "offload": bool(getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False)),
                "params_held": held / sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)}
    masters = {str(p.dtype) for g in module.optimizer.param_groups for p in g["params"]}
    grads = {str(p.main_grad.dtype) for c in module.chunks for p in c.parameters() if hasattr(p, "main_grad")}
    return {"master": sorted(masters), "reduce": sorted(grads)}


def _run_case(rank: int, world_size: int, name: str, hf_dir: Path) -> dict:
    from megatron.core import parallel_state as ps

    from parallel.mesh import init_distributed
    from pretrain.build import build_train_module
    from pretrain.config import validate_job
    from pretrain.data import microbatches
    from pretrain.models.hf import Layout, local_state_dict

    kind, layout, precision, _ = _case(name)
    job = _job(hf_dir, layout, precision, poison=name.endswith("poison"), z_loss=Z_LOSS if kind == "moez" else None)
    dp = validate_job(job, world_size=world_size).dp
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    mesh = init_distributed(job.parallel, seed=job.trainer.seed)
    module = build_train_module(job, vocab_size=job.model.vocab_size)
    batches = microbatches(_global_batch(job.model.vocab_size), global_batch_size=GBS, micro_batch_size=MBS,
                           dp_rank=mesh.dp_rank, dp_size=dp, start_step=0)
    per_step = [next(batches) for _ in range(STEPS)]
    # Validation loss (forward only) on the first two global batches: on the initial weights, which every
    # layout shares, and again after the steps.
    evals = [module.evaluate(per_step[:2])]
    # A poisoned step (NaN loss) runs on the batch of the step after it, which then runs again clean:
    # the run must match 3 clean steps exactly, so the skipped step may leave no trace.
    plan = [(i, False) for i in range(STEPS)]
    for bad in job.trainer.inject_nan_steps:
        plan.insert(bad - 1, (bad - 1, True))
    steps = [dataclasses.asdict(module.train_batch(per_step[i], poison=poison)) for i, poison in plan]
    evals.append(module.evaluate(per_step[:2]))
    if hasattr(module, "engine"):  # DeepSpeed: whole tensors (gathered under ZeRO-3), the same on every rank
        state = module.full_state_dict()
        shards = [(Layout(), state)] if rank == 0 else []
    else:
        shards = [(Layout.current(vp_stage=i if len(module.chunks) > 1 else None), local_state_dict(c))
                  for i, c in enumerate(module.chunks)]
    shards = [(lay, {k: v.float() for k, v in sd.items()}) for lay, sd in shards]
    return {"steps": steps, "shards": shards, "precision": _precision_report(module), "mesh": mesh.describe(),
            "evals": evals}


def run_cases(rank: int, world_size: int, names: list[str], hf_dirs: dict) -> dict:
    return {name: _run_case(rank, world_size, name, hf_dirs[_case(name)[0]]) for name in names}


def _ref_name(kind: str, precision: str) -> str:
    return f"ref-{kind}-{precision}"


def _case(name: str) -> tuple[str, dict, str, int]:
    if name in CASES:
        return CASES[name]
    _, kind, precision = name.split("-")
    return kind, {}, precision, 1


# --------------------------------------------------------------------------------------------------
# In the test process
# --------------------------------------------------------------------------------------------------
HAVE_DEEPSPEED = have_deepspeed()


def _is_deepspeed(name: str) -> bool:
    return _case(name)[1].get("zero", 1) in (2, 3)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts_hf")
    dirs = {}
    for seed, kind in enumerate(("dense", "moe", "tied", "qwen3", "qwen3_moe"), start=1):
        dirs[kind] = root / kind
        build_tiny_hf("dense" if kind == "tied" else kind, seed=seed,
                      tied=kind in ("tied", "qwen3")).save_pretrained(dirs[kind])
    dirs["moez"] = dirs["moe"]
    return dirs


def _collect(hf_dirs: dict, names: list[str], world_size: int) -> dict:
    """Run ``names`` in one multi-rank job; per case: rank 0's step results and the whole model in HF names."""
    from pretrain.models.hf import HFCheckpoint, model_config_from_hf
    from pretrain.models.hf import to_hf

    names = [n for n in names if HAVE_DEEPSPEED or not _is_deepspeed(n)]
    ranks = run_distributed(run_cases, world_size, names, dict(hf_dirs), timeout=600)
    out = {}
    for name in names:
        model = model_config_from_hf(HFCheckpoint(hf_dirs[_case(name)[0]]).config, name="tiny")
        shards = [shard for r in ranks for shard in r[name]["shards"]]
        out[name] = dict(ranks[0][name], weights=to_hf(shards, model), shards=None)
    return out


def _selected(request) -> list[str]:
    """The cases this session runs (all, or those picked with -k / node ids): the multi-rank jobs run only these."""
    names = {item.callspec.params["name"] for item in request.session.items
             if item.module.__name__ == __name__ and "name" in getattr(getattr(item, "callspec", None), "params", {})}
    return [n for n in CASES if n in names]


@pytest.fixture(scope="module")
def references(hf_dirs, request) -> dict:
    needed = {(CASES[n][0], CASES[n][2]) for n in _selected(request)}
    needed |= {(kind, "fp32") for kind, precision in needed if precision == "bf16"}  # bf16 is also checked vs fp32
    return _collect(hf_dirs, [_ref_name(kind, precision) for kind, precision in sorted(needed & REFERENCES)], 1)


@pytest.fixture(scope="module")
def two_ranks(hf_dirs, request) -> dict:
    return _collect(hf_dirs, [n for n in _selected(request) if CASES[n][3] == 2], 2)


@pytest.fixture(scope="module")
def four_ranks(hf_dirs, request) -> dict:
    return _collect(hf_dirs, [n for n in _selected(request) if CASES[n][3] == 4], 4)


MEASURED: dict[str, dict] = {}  # name -> max differences, printed at the end of the module


def _max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", list(CASES))
def test_layout_trains_like_one_process(name, request, references):
    kind, layout, precision, world_size = CASES[name]
    if _is_deepspeed(name) and not HAVE_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed (DS_BUILD_OPS=0 pip install deepspeed==0.19.8)")
    run = request.getfixturevalue("two_ranks" if world_size == 2 else "four_ranks")[name]
    ref = references[_ref_name(kind, precision)]
    steps = run["steps"]
    if name.endswith("poison"):
        assert [s["skipped"] for s in steps] == [False, True, False, False]
        # Skipped: the LR schedule did not advance either (a skipped step reports the LR in force).
        assert math.isnan(steps[1]["loss"]) and steps[1]["lr"] == steps[0]["lr"]
        steps = [s for s in steps if not s["skipped"]]
    assert not any(s["skipped"] for s in steps)
    loss_diff = max(abs(s["loss"] - r["loss"]) for s, r in zip(steps, ref["steps"]))
    norm_diff = max(abs(s["grad_norm"] - r["grad_norm"]) / r["grad_norm"] for s, r in zip(steps, ref["steps"]))
    weight_diff = _max_weight_diff(run["weights"], ref["weights"])
    MEASURED[name] = dict(loss=loss_diff, grad_norm_rel=norm_diff, weights=weight_diff, mesh=run["mesh"])
    if _is_deepspeed(name):
        assert run["precision"]["offload"] == layout.get("offload_optimizer", False)
        if layout["zero"] == 3:  # each rank holds half of every matrix (1-D tensors stay whole)
            assert run["precision"]["params_held"] < 0.6, run["precision"]
        else:
            assert run["precision"]["params_held"] == 1.0
    assert [s["tokens"] for s in steps] == [r["tokens"] for r in ref["steps"]]
    # Validation loss: the same per-token mean over the same tokens as one process (before and after training).
    assert [t for _, t in run["evals"]] == [steps[0]["tokens"] + steps[1]["tokens"]] * 2
    eval_diff = max(abs(a - b) for (a, _), (b, _) in zip(run["evals"], ref["evals"]))
    MEASURED[name]["eval"] = eval_diff
    assert eval_diff <= (FP32_TOL if precision == "fp32" else BF16_LOSS_TOL), (run["evals"], ref["evals"])
    if layout.get("cp", 1) > 1:  # the cp ranks of one replica read the same samples: not counted in dp
        model_ranks = layout.get("tp", 1) * layout.get("pp", 1) * layout["cp"]
        assert f"cp={layout['cp']} " in run["mesh"] and f"dp={world_size // model_ranks} " in run["mesh"], run["mesh"]
    if kind in ("moe", "moez", "qwen3_moe") and not _is_deepspeed(name):  # router statistics: the same tokens per expert, same aux loss
        for s, r in zip(steps, ref["steps"]):
            assert s["extras"]["moe/expert_tokens"] == r["extras"]["moe/expert_tokens"]
            assert s["extras"]["moe/load_balancing_loss"] == pytest.approx(
                r["extras"]["moe/load_balancing_loss"], abs=FP32_TOL)
    assert [s["lr"] for s in steps] == pytest.approx([r["lr"] for r in ref["steps"]], rel=1e-12)
    if precision == "fp32":
        assert loss_diff <= FP32_TOL, [(s["loss"], r["loss"]) for s, r in zip(steps, ref["steps"])]
        assert norm_diff <= FP32_TOL
        assert weight_diff <= WEIGHT_TOL.get(name, FP32_TOL)
    else:
        assert run["precision"]["master"] == ["torch.float32"] and run["precision"]["reduce"] == ["torch.float32"]
        assert loss_diff <= BF16_LOSS_TOL, [(s["loss"], r["loss"]) for s, r in zip(steps, ref["steps"])]
        assert norm_diff <= 0.05
        # The bf16 model weights: Adam moves each weight by ~LR per step whatever the gradient's size, so
        # bf16 rounding can flip single updates (<= 2 LR per step), and a master weight a hair away can
        # round to the neighbouring bf16 value (one bf16 ulp: <= 2^-7 relative).
        for key, ref_w in ref["weights"].items():
            torch.testing.assert_close(run["weights"][key], ref_w, atol=2 * STEPS * LR, rtol=2**-7, msg=key)
        fp32 = references[_ref_name(kind, "fp32")]
        MEASURED[name]["loss_vs_fp32"] = max(abs(s["loss"] - r["loss"]) for s, r in zip(steps, fp32["steps"]))
        assert MEASURED[name]["loss_vs_fp32"] <= BF16_LOSS_TOL


def test_print_measured_differences():
    """Not a check: the table of measured worst differences (pytest -s shows it)."""
    print("\n| layout | mesh (rank 0) | max loss diff | max rel grad-norm diff | max weight diff | bf16: loss vs fp32 "
          "| eval loss diff |")
    print("|---|---|---|---|---|---|---|")
    for name, m in MEASURED.items():
        vs32 = f"{m['loss_vs_fp32']:.2e}" if "loss_vs_fp32" in m else ""
        print(f"| {name} | {m['mesh'].split(' (')[0]} | {m['loss']:.2e} | {m['grad_norm_rel']:.2e} | "
              f"{m['weights']:.2e} | {vs32} | {m.get('eval', float('nan')):.2e} |")
