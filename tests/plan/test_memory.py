"""The planner's memory model against what the real trainer allocates and saves (CPU, gloo ranks).

Model states: every layout builds the real train module (``pretrain.build.build_train_module``), runs one
optimizer step (Adam's moments exist after it) and counts the bytes of its tensors per category and rank
(``pretrain.plan.measure.model_state_bytes``); the planner must agree within 1% on every rank.
Activations: bytes saved for backward (saved-tensor hooks, deduplicated by storage), per layer and at the
schedule's peak, must agree within 10%.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.testing import have_deepspeed, run_distributed

VOCAB = 1000  # not a multiple of 128 × tp: padding of the buffers matters
HAVE_DEEPSPEED = have_deepspeed()


def _model(kind: str, **overrides):
    from pretrain.models.config import ModelConfig

    moe = dict(num_experts=4, moe_topk=2, moe_ffn_hidden_size=32, shared_expert_ffn_hidden_size=64)
    base = dict(name="t", hidden_size=64, ffn_hidden_size=160, num_layers=4, num_heads=4, num_kv_heads=2,
                vocab_size=VOCAB, tie_embeddings=kind == "tied", **(moe if kind == "moe" else {}))
    return ModelConfig(**{**base, **overrides})


def _job(kind: str, layout: dict, precision: str, *, seq: int = 32, mbs: int = 2, microbatches: int = 2,
         recompute: str = "none", dp: int = 1, **model_overrides):
    from parallel.config import ParallelConfig
    from pretrain.config import DataConfig, JobConfig, OptimConfig, TrainerConfig, WandbConfig

    extra = {}
    if recompute != "none":
        extra = dict(recompute=recompute, recompute_modules=["core_attn", "mlp"] if recompute == "selective" else
                     ["core_attn"])
    return JobConfig(
        model=_model(kind, **model_overrides), data=DataConfig(seq_len=seq), parallel=ParallelConfig(**layout),
        optim=OptimConfig(), trainer=TrainerConfig(steps=2, micro_batch_size=mbs, global_batch_size=mbs * microbatches * dp,
                                                   precision=precision, wandb=WandbConfig(mode="disabled"), **extra))


def _microbatches(job, n: int, dp_rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(dp_rank)
    seq, mbs = job.data.seq_len, job.trainer.micro_batch_size
    out = []
    for _ in range(n):
        tok = torch.randint(0, VOCAB, (mbs, seq), generator=g)
        out.append({"tokens": tok, "labels": tok.roll(-1, 1), "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, seq)})
    return out


def _build(job, world_size: int):
    from megatron.core import parallel_state as ps

    from parallel.mesh import init_distributed
    from pretrain.build import build_train_module
    from pretrain.config import validate_job

    validate_job(job, world_size)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    mesh = init_distributed(job.parallel, seed=0)
    return build_train_module(job, vocab_size=VOCAB), mesh


def run_states(rank: int, world_size: int, cases: dict) -> dict:
    from pretrain.plan.measure import model_state_bytes

    out = {}
    for name, (kind, layout, precision) in cases.items():
        job = _job(kind, layout, precision, dp=world_size)
        module, mesh = _build(job, world_size)
        # Measured as the second optimizer step starts: gradients reduced, Adam's moments allocated (the
        # high-water mark of model states; DeepSpeed ZeRO-2 frees its gradient partition after each step).
        owner = module.engine.optimizer if hasattr(module, "engine") else module.optimizer
        seen, step = {}, owner.step

        def measuring_step(*a, **kw):
            seen["bytes"] = model_state_bytes(module)
            return step(*a, **kw)

        owner.step = measuring_step
        for _ in range(2):
            module.train_batch(_microbatches(job, job.trainer.global_batch_size // (2 * mesh.dp), mesh.dp_rank))
        out[name] = dict(bytes=seen["bytes"], pp_rank=mesh.pp_rank, dp_rank=mesh.dp_rank,
                         cp_rank=mesh.cp_rank, tp_rank=mesh.tp_rank)
        del module, owner, step, measuring_step
    return out


STATE_CASES = {
    2: {
        "tp2-sp-bf16": ("dense", dict(tp=2, sequence_parallel=True), "bf16"),
        "pp2-fp32": ("dense", dict(pp=2), "fp32"),
        "pp2-vpp2-bf16": ("dense", dict(pp=2, vpp=2), "bf16"),
        "pp2-tied-bf16": ("tied", dict(pp=2), "bf16"),
        "dp2-zero0-bf16": ("dense", dict(zero=0), "bf16"),
        "dp2-zero1-bf16": ("dense", dict(zero=1), "bf16"),
        "cp2-bf16": ("dense", dict(cp=2), "bf16"),
        "ep2-bf16": ("moe", dict(ep=2), "bf16"),
        "ds-zero2-bf16": ("dense", dict(zero=2), "bf16"),
        "ds-zero3-bf16": ("dense", dict(zero=3), "bf16"),
    },
    4: {
        "tp2-sp-pp2-bf16": ("dense", dict(tp=2, sequence_parallel=True, pp=2), "bf16"),
        "moe-tp2-sp-ep2-etp1-bf16": ("moe", dict(tp=2, sequence_parallel=True, ep=2, etp=1), "bf16"),
    },
}


@pytest.fixture(scope="module")
def measured_states() -> dict:
    out = {}
    for world, cases in STATE_CASES.items():
        cases = {n: c for n, c in cases.items() if HAVE_DEEPSPEED or c[1].get("zero", 1) < 2}
        ranks = run_distributed(run_states, world, cases, timeout=600)
        for name in cases:
            out[name] = [r[name] for r in ranks]
    return out


@pytest.mark.parametrize("name", [n for cases in STATE_CASES.values() for n in cases])
def test_model_states_match_the_trainer(name, measured_states):
    from pretrain.plan.memory import Layout, model_states

    world = next(w for w, c in STATE_CASES.items() if name in c)
    kind, layout, precision = STATE_CASES[world][name]
    if layout.get("zero", 1) >= 2 and not HAVE_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed")
    p = dict(layout)
    tp, pp, cp = p.get("tp", 1), p.get("pp", 1), p.get("cp", 1)
    lay = Layout(**{k: v for k, v in p.items() if k in {f.name for f in dataclasses.fields(Layout)}},
                 dp=world // (tp * pp * cp))
    for r, got in enumerate(measured_states[name]):
        want = model_states(_model(kind), VOCAB, lay, bf16=precision == "bf16", pp_rank=got["pp_rank"],
                            dp_rank=got["dp_rank"] + got["cp_rank"] * 0)
        measured = got["bytes"]
        for category in ("weights", "gradients", "master_weights", "optimizer_state"):
            m, w = measured[category], getattr(want, category)
            assert abs(m - w) <= 0.01 * max(m, 1), (name, r, category, m, w, measured, want)


# --------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------
ACT_CASES = {  # name -> (model kind, layout, precision, seq, micro-batch size, microbatches, recompute)
    1: {
        "bf16-s64-b2": ("dense", {}, "bf16", 64, 2, 2, "none"),
        "fp32-s32-b4": ("dense", {}, "fp32", 32, 4, 2, "none"),
        "bf16-s128-b1-wide": ("wide", {}, "bf16", 128, 1, 2, "none"),
        "bf16-s64-b2-full": ("dense", {}, "bf16", 64, 2, 2, "full"),
        "bf16-s64-b2-selective": ("dense", {}, "bf16", 64, 2, 2, "selective"),
        "moe-bf16-s64-b2": ("moe", {}, "bf16", 64, 2, 2, "none"),
    },
    2: {
        "pp2-bf16-s64-b2-m4": ("dense", dict(pp=2), "bf16", 64, 2, 4, "none"),
        "pp2-vpp2-bf16-s32-b2-m4": ("dense", dict(pp=2, vpp=2), "bf16", 32, 2, 4, "none"),
        "tp2-sp-bf16-s64-b2": ("dense", dict(tp=2, sequence_parallel=True), "bf16", 64, 2, 2, "none"),
        "tp2-bf16-s64-b2": ("dense", dict(tp=2), "bf16", 64, 2, 2, "none"),
    },
}
WIDE = dict(hidden_size=128, ffn_hidden_size=352, num_heads=8, num_kv_heads=2)


def run_activations(rank: int, world_size: int, cases: dict) -> dict:
    from pretrain.plan.measure import SavedTensorMeter

    out = {}
    for name, (kind, layout, precision, seq, mbs, n_micro, recompute) in cases.items():
        overrides = WIDE if kind == "wide" else {}
        job = _job("dense" if kind == "wide" else kind, layout, precision, seq=seq, mbs=mbs, microbatches=n_micro,
                   recompute=recompute, **overrides)
        module, mesh = _build(job, world_size)
        params = [p for c in module.chunks for p in c.parameters()]
        meter = SavedTensorMeter(exclude=params)
        layers = {}
        for chunk in module.chunks:
            gpt = chunk.module
            gpt = getattr(gpt, "module", gpt)  # Float16Module wraps the GPTModel once more
            layers.update({layer.layer_number: layer for layer in gpt.decoder.layers})
        handles = meter.attach(layers)
        with meter():
            module.train_batch(_microbatches(job, n_micro, 0))
        for h in handles:
            h.remove()
        out[name] = dict(per_layer={k: v / n_micro for k, v in meter.per_layer.items() if k is not None},
                         peak=meter.peak, pp_rank=mesh.pp_rank)
        del module
    return out


@pytest.fixture(scope="module")
def measured_activations() -> dict:
    out = {}
    for world, cases in ACT_CASES.items():
        ranks = run_distributed(run_activations, world, cases, timeout=600)
        for name in cases:
            out[name] = [r[name] for r in ranks]
    return out


@pytest.mark.parametrize("name", [n for cases in ACT_CASES.values() for n in cases])
def test_activations_match_saved_tensors(name, measured_activations):
    from pretrain.plan.memory import Layout, activations, stage_activation_peak

    world = next(w for w, c in ACT_CASES.items() if name in c)
    kind, layout, precision, seq, mbs, n_micro, recompute = ACT_CASES[world][name]
    model = _model("dense", **WIDE) if kind == "wide" else _model(kind)
    p = dict(layout)
    lay = Layout(**p, micro_batch_size=mbs, recompute=recompute,
                 recompute_modules=("core_attn", "mlp") if recompute == "selective" else ("core_attn",),
                 dp=world // (p.get("tp", 1) * p.get("pp", 1)))
    bf16 = precision == "bf16"
    act = activations(model, VOCAB, lay, seq, bf16=bf16)
    for got in measured_activations[name]:
        if recompute == "none":  # per layer: what its forward saved (with recompute, the re-run saves it again)
            for layer, measured in got["per_layer"].items():
                assert abs(measured - act.per_layer) <= 0.10 * measured, (name, layer, measured, act.per_layer)
        held, loss = stage_activation_peak(model, VOCAB, lay, seq, n_micro, bf16=bf16, pp_rank=got["pp_rank"])
        predicted = held + loss - (act.logits_transient if got["pp_rank"] == lay.pp - 1 else 0)
        assert abs(got["peak"] - predicted) <= 0.10 * got["peak"], (name, got["pp_rank"], got["peak"], predicted)
