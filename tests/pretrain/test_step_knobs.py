"""Training-step knobs: activation recompute, fused AdamW, torch.compile, and the validation loss.

Each knob changes how a step is computed, never what: the same job with and without it gives the same
losses, gradient norms and weights (recompute: bit-identical; fused AdamW and compile: within 1e-6 / 1e-5),
and evaluation leaves weights, RNG and the following training losses bit-identical. Cross-layout eval
parity (TP2, PP2, EP, DeepSpeed vs one process) lives in tests/parallel/test_layouts.py.

Cost control: one ``run_distributed`` call per world size runs every case (megatron's parallel state is
rebuilt between them); a 2-layer width-64 model, 32-token sequences, 2 steps.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from common.errors import ConfigError
from jobs import GBS, SEQ, STEPS, VOCAB, batches, make_job, start
from parallel.testing import have_deepspeed, run_distributed
from pretrain.testing import write_learnable_shards

# name -> (parallel layout, trainer overrides, optim overrides)
ONE_RANK = {
    "none": ({}, {}, {}),
    "full-uniform": ({}, dict(recompute="full"), {}),
    "full-uniform-2": ({}, dict(recompute="full", recompute_num_layers=2), {}),
    "full-block": ({}, dict(recompute="full", recompute_method="block", recompute_num_layers=1), {}),
    "selective": ({}, dict(recompute="selective", recompute_modules=["core_attn", "mlp"]), {}),
    "fused": ({}, {}, dict(fused=True)),
    "compile": ({}, dict(compile=True), {}),
}
TWO_RANKS = {
    "tp2": (dict(tp=2), {}, {}),
    "tp2-full": (dict(tp=2), dict(recompute="full"), {}),
    "tp2-selective": (dict(tp=2), dict(recompute="selective"), {}),
    "pp2": (dict(pp=2), {}, {}),
    "pp2-full": (dict(pp=2), dict(recompute="full"), {}),
    # DeepSpeed runs the same GPTModel (megatron's checkpointing inside ZeRO-3's parameter gathering hooks).
    "ds-zero3": (dict(zero=3), {}, {}),
    "ds-zero3-full": (dict(zero=3), dict(recompute="full"), {}),
}


def _job(layout: dict, trainer: dict, optim: dict, **data):
    return make_job(layout=layout, trainer=trainer, optim=optim, **data)


def _rng_states() -> list[torch.Tensor]:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return [torch.get_rng_state()] + [tracker[k].clone() for k in sorted(tracker)]


def _params(module) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": p.detach().clone() for i, c in enumerate(module.chunks) for k, p in c.named_parameters()}


def _run_case(world_size: int, name: str, layout: dict, trainer: dict, optim: dict) -> dict:
    from torch._dynamo.utils import counters

    module = start(_job(layout, trainer, optim), world_size)
    data = batches(STEPS + 1)
    breaks_before, graphs_before = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    out: dict = {"eval_before": module.evaluate(data[-1:])}
    out["steps"] = [dataclasses.asdict(module.train_batch(b)) for b in data[:STEPS]]
    out["eval_after"] = module.evaluate(data[-1:])
    out["config"] = {k: getattr(module.config, k) for k in ("recompute_granularity", "recompute_method",
                                                             "recompute_num_layers", "recompute_modules")}
    if hasattr(module, "engine"):  # DeepSpeed: no megatron chunks or optimizer; losses and evals compare
        return out
    out["params"] = _params(module)
    inner = module.optimizer.optimizer
    out["fused"] = [g["fused"] for g in inner.param_groups]
    if name == "compile":
        out["graph_breaks"] = sum(counters["graph_break"].values()) - breaks_before
        out["graphs"] = counters["stats"]["unique_graphs"] - graphs_before
        gpt = module.chunks[0].module
        out["compiled_layers"] = sum(getattr(layer, "_compiled_call_impl", None) is not None
                                     for layer in gpt.decoder.layers)
        import torch._dynamo

        torch._dynamo.reset()
    return out


def _eval_invariance(world_size: int) -> dict:
    """Train 2 steps with an evaluation before, between and after them, checking what eval may not touch."""
    module = start(_job({}, {}, {}), world_size)
    data = batches(STEPS + 1)
    out = {"steps": [], "untouched": []}
    for b in data[:STEPS]:
        params, rng = _params(module), _rng_states()
        grads = [p.main_grad.clone() for c in module.chunks for p in c.parameters()]
        module.evaluate(data[-1:])
        out["untouched"].append(
            all(torch.equal(a, b) for a, b in zip(params.values(), _params(module).values()))
            and all(torch.equal(a, b) for a, b in zip(rng, _rng_states()))
            and all(torch.equal(a, p.main_grad) for a, p in zip(grads, (p for c in module.chunks for p in c.parameters())))
            and all(c.training for c in module.chunks)
        )
        out["steps"].append(dataclasses.asdict(module.train_batch(b)))
    out["params"] = _params(module)
    return out


def _trainer_runs(root: Path, shards: Path) -> dict:
    """The Trainer end to end in one process: 5 steps with eval_every=2 (evaluations at 2, 4 and 5, the end)
    and without evaluation; their metrics.jsonl rows."""
    from megatron.core import parallel_state as ps

    from parallel.mesh import init_distributed
    from pretrain.build import build_trainer
    from pretrain.data import Shards

    rows = {}
    for name, every in (("eval", 2), ("no_eval", 0)):
        job = _job({}, dict(steps=5, eval_every=every, eval_steps=2, log_every=100), {}, paths=[str(shards)],
                   split="90,10,0")
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        mesh = init_distributed(job.parallel, seed=job.trainer.seed)
        run_dir = root / name
        run_dir.mkdir()
        trainer = build_trainer(job, run_dir, mesh, Shards.from_config(job.data))
        trainer.fit()
        rows[name] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows


def run_one_rank(rank: int, world_size: int, root: Path, shards: Path) -> dict:
    out = {name: _run_case(world_size, name, *case) for name, case in ONE_RANK.items()}
    out["eval_invariance"] = _eval_invariance(world_size)
    out["trainer"] = _trainer_runs(root, shards)
    return out


def run_two_ranks(rank: int, world_size: int, names: list[str]) -> dict:
    return {name: _run_case(world_size, name, *TWO_RANKS[name]) for name in names}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("knobs")
    shards = write_learnable_shards(root / "shards", vocab_size=VOCAB, documents=40)
    (result,) = run_distributed(run_one_rank, 1, root, shards, timeout=600)
    return result


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    names = [n for n in TWO_RANKS if not n.startswith("ds-") or have_deepspeed()]
    return run_distributed(run_two_ranks, 2, names, timeout=300)[0]  # losses and evals are global: rank 0's


def _max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", ["full-uniform", "full-uniform-2", "full-block", "selective"])
def test_recompute_is_bit_identical_to_storing_activations(one_rank, name):
    run, ref = one_rank[name], one_rank["none"]
    trainer = ONE_RANK[name][1]
    assert run["config"]["recompute_granularity"] == trainer["recompute"]  # really on
    if trainer["recompute"] == "full":
        assert run["config"]["recompute_method"] == trainer.get("recompute_method", "uniform")
        assert run["config"]["recompute_num_layers"] == trainer.get("recompute_num_layers", 1)
    else:
        assert run["config"]["recompute_modules"] == ["core_attn", "mlp"]
    assert [s["loss"] for s in run["steps"]] == [s["loss"] for s in ref["steps"]]
    assert [s["grad_norm"] for s in run["steps"]] == [s["grad_norm"] for s in ref["steps"]]
    assert _max_param_diff(run["params"], ref["params"]) <= 1e-6  # measured: 0 (same kernels, same order)
    assert run["eval_after"] == ref["eval_after"]


def test_fused_adamw_matches_the_for_loop_kernel(one_rank):
    run, ref = one_rank["fused"], one_rank["none"]
    assert all(run["fused"]) and not any(ref["fused"])  # CPU auto = unfused; true forces the fused kernel
    assert [s["loss"] for s in run["steps"]][0] == ref["steps"][0]["loss"]  # before any update: the same model
    assert [s["loss"] for s in run["steps"]] == pytest.approx([s["loss"] for s in ref["steps"]], abs=1e-6)
    assert _max_param_diff(run["params"], ref["params"]) <= 1e-6


def test_compile_matches_eager_without_graph_breaks(one_rank):
    run, ref = one_rank["compile"], one_rank["none"]
    assert run["compiled_layers"] == 2
    # megatron's per-call tp_group deprecation warning is skipped inside compiled code: whole-layer graphs.
    assert run["graph_breaks"] == 0
    assert run["graphs"] >= 1  # really traced (measured: 2 graphs for 2 layers in train and eval mode)
    assert [s["loss"] for s in run["steps"]] == pytest.approx([s["loss"] for s in ref["steps"]], abs=1e-5)
    assert _max_param_diff(run["params"], ref["params"]) <= 1e-5
    assert run["eval_after"][0] == pytest.approx(ref["eval_after"][0], abs=1e-5)  # eval mode compiles too


def test_eval_touches_nothing_and_training_is_bit_identical(one_rank):
    run, ref = one_rank["eval_invariance"], one_rank["none"]
    assert run["untouched"] == [True] * STEPS  # weights, gradient buffers, RNG states, train mode
    # "none" evaluated only before and after its steps: the losses in between are the same bits.
    assert [s["loss"] for s in run["steps"]] == [s["loss"] for s in ref["steps"]]
    assert [s["grad_norm"] for s in run["steps"]] == [s["grad_norm"] for s in ref["steps"]]
    assert _max_param_diff(run["params"], ref["params"]) == 0.0
    assert ref["eval_after"][0] < ref["eval_before"][0]  # it measures the model: training lowered it


def test_trainer_logs_eval_every_n_steps_and_at_the_end(one_rank):
    with_eval, without = one_rank["trainer"]["eval"], one_rank["trainer"]["no_eval"]
    assert [r["step"] for r in with_eval] == [r["step"] for r in without] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]  # bit-identical training
    assert [r["step"] for r in with_eval if "eval/loss" in r] == [2, 4, 5]
    assert not any("eval/loss" in r for r in without)
    evals = [r for r in with_eval if "eval/loss" in r]
    assert all(r["eval/tokens"] == 2 * GBS * SEQ for r in evals)  # eval_steps=2 batches, nothing masked
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # learnable data: the held-out loss falls too


@pytest.mark.parametrize("name", ["tp2-full", "tp2-selective", "pp2-full", "ds-zero3-full"])
def test_recompute_under_tp2_pp2_and_zero3(two_ranks, name):
    if name not in two_ranks:
        pytest.skip("DeepSpeed is not installed (DS_BUILD_OPS=0 pip install deepspeed==0.19.8)")
    run, ref = two_ranks[name], two_ranks[name.rsplit("-", 1)[0]]
    assert run["config"]["recompute_granularity"] is not None
    assert [s["loss"] for s in run["steps"]] == [s["loss"] for s in ref["steps"]]
    assert [s["grad_norm"] for s in run["steps"]] == pytest.approx([s["grad_norm"] for s in ref["steps"]], abs=1e-7)
    assert run["eval_after"] == ref["eval_after"]  # the same weights after the steps, to the bit


def test_tp2_eval_equals_one_process(one_rank, two_ranks):
    # TP2 initialises the same full weights as one process and splits them (PP stages draw their own: PP2,
    # interleaved PP, EP and DeepSpeed get their shared weights from init_from in test_layouts.py).
    for key in ("eval_before", "eval_after"):
        (loss, tokens), (ref_loss, ref_tokens) = two_ranks["tp2"][key], one_rank["none"][key]
        assert tokens == ref_tokens
        assert abs(loss - ref_loss) <= 1e-5, (key, loss, ref_loss)


@pytest.mark.parametrize("trainer, field", [
    (dict(recompute="partial"), "trainer.recompute"),
    (dict(recompute="full", recompute_method="every"), "trainer.recompute_method"),
    (dict(recompute_num_layers=0), "trainer.recompute_num_layers"),
    (dict(recompute="selective", recompute_modules=["layernorm"]), "trainer.recompute_modules"),
    (dict(recompute="selective", recompute_modules=["attention"]), "trainer.recompute_modules"),
    (dict(eval_every=-1), "trainer.eval_every"),
    (dict(eval_steps=0), "trainer.eval_steps"),
])
def test_bad_knob_names_its_field(trainer, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _job({}, trainer, {})


@pytest.mark.parametrize("layout, trainer, data, field", [
    ({}, dict(recompute="full", recompute_num_layers=3), {}, "trainer.recompute_num_layers=3"),  # 2 layers
    (dict(pp=2), dict(recompute="full", recompute_num_layers=2), {}, "trainer.recompute_num_layers=2"),  # 1 per stage
    (dict(zero=3), dict(compile=True), {}, "trainer.compile"),
    ({}, dict(eval_every=10), dict(split="100,0,0"), "data.split"),  # no validation share to evaluate on
])
def test_bad_knob_for_the_job_names_its_field(layout, trainer, data, field):
    from pretrain.config import validate_job

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_job(_job(layout, trainer, {}, **data), world_size=2)
