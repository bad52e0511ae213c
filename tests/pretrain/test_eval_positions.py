"""Validation loss by token position (trainer.eval_position_buckets): the buckets add up to the overall eval loss,
and every layout (cp2, tp2, dp2, DeepSpeed ZeRO-2 dp2) gives one process's bucket losses.

Sequences of 48 tokens in 3 buckets of 16 while cp2 cuts them in 4 chunks of 12 (r and 3 - r per rank): a bucket
spans both cp ranks, so its sum only comes out right when positions come from the sliced position_ids.
A 2-layer width-64 model trained 2 steps first, so the buckets differ; random tokens, a quarter of the loss masked.
"""
from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from parallel.testing import have_deepspeed, run_distributed

SEQ, GBS, MBS, VOCAB, BUCKETS = 48, 4, 2, 256, 3
LAYOUTS = {"cp2": dict(cp=2), "tp2": dict(tp=2), "dp2": {}, "ds-zero2": dict(zero=2)}


def _job(layout: dict, **trainer):
    from parallel.config import ParallelConfig
    from pretrain.config import DataConfig, JobConfig, OptimConfig, TrainerConfig, WandbConfig
    from pretrain.models.config import ModelConfig

    return JobConfig(
        model=ModelConfig(vocab_size=VOCAB, num_layers=2, max_seq_len=SEQ),
        data=DataConfig(seq_len=SEQ),
        parallel=ParallelConfig(**layout),
        optim=OptimConfig(lr=1e-2, eps=1e-6, warmup_steps=0),
        trainer=TrainerConfig(**{"steps": 2, "micro_batch_size": MBS, "global_batch_size": GBS,
                                 "wandb": WandbConfig(mode="disabled"), "plot_loss": False,
                                 "eval_every": 1, "eval_position_buckets": BUCKETS, **trainer}),
    )


def _batches(n: int, dp_rank: int, dp: int) -> list[list[dict[str, torch.Tensor]]]:
    """``n`` global batches of random tokens; this data-parallel rank's microbatches of each."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        mbs = []
        for _ in range(GBS // MBS):
            seq = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
            mbs.append(dict(tokens=seq[:, :-1], labels=seq[:, 1:], position_ids=torch.arange(SEQ).expand(MBS, SEQ),
                            loss_mask=(torch.rand(MBS, SEQ, generator=g) > 0.25).float()))
        out.append(mbs[dp_rank::dp])
    return out


def _case(world_size: int, layout: dict) -> dict:
    from megatron.core import parallel_state as ps

    from parallel.mesh import init_distributed
    from pretrain.build import build_train_module
    from pretrain.config import validate_job

    job = _job(layout)
    validate_job(job, world_size=world_size)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(job.parallel, seed=job.trainer.seed)
    module = build_train_module(job, vocab_size=VOCAB)
    zero = layout.get("zero", 0)
    dp_rank, dp = (torch.distributed.get_rank(), world_size) if zero else (ps.get_data_parallel_rank(),
                                                                          ps.get_data_parallel_world_size())
    batches = _batches(4, dp_rank, dp)
    for batch in batches[:2]:
        module.train_batch(batch)
    loss, tokens, buckets = module.evaluate_by_position(batches[2:], BUCKETS)
    plain = module.evaluate(batches[2:])
    return {"loss": loss, "tokens": tokens, "plain": plain,
            "buckets": [(b.start, b.end, b.loss, b.tokens) for b in buckets]}


def run_cases(rank: int, world_size: int, names: list[str]) -> dict:
    return {name: _case(world_size, LAYOUTS.get(name, {})) for name in names}


@pytest.fixture(scope="module")
def results() -> dict:
    names = [n for n in LAYOUTS if n != "ds-zero2" or have_deepspeed()]
    (one,) = run_distributed(run_cases, 1, ["single"], timeout=300)
    two = run_distributed(run_cases, 2, names, timeout=300)[0]  # every figure is global: rank 0's
    return {**one, **two}


def test_position_buckets_add_up_to_the_eval_loss(results):
    run = results["single"]
    assert [(s, e) for s, e, _, _ in run["buckets"]] == [(0, 16), (16, 32), (32, 48)]
    assert sum(t for *_, t in run["buckets"]) == run["tokens"]
    # Token-weighted bucket means are the overall mean: the same per-token losses, only grouped.
    mean = sum(loss * t for _, _, loss, t in run["buckets"]) / run["tokens"]
    assert mean == pytest.approx(run["loss"], rel=1e-6, abs=0)
    assert run["plain"] == (run["loss"], run["tokens"])  # evaluate() is the same evaluation without buckets
    losses = [loss for _, _, loss, _ in run["buckets"]]
    assert max(losses) - min(losses) > 1e-4  # the buckets really differ (they are not the overall mean thrice)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_give_one_process_bucket_losses(results, name):
    if name not in results:
        pytest.skip("deepspeed is not installed")
    run, ref = results[name], results["single"]
    assert [t for *_, t in run["buckets"]] == [t for *_, t in ref["buckets"]]
    for (s, e, loss, _), (_, _, ref_loss, _) in zip(run["buckets"], ref["buckets"]):
        assert loss == pytest.approx(ref_loss, abs=2e-5), (name, s, e, run["buckets"], ref["buckets"])
    assert sum(loss * t for _, _, loss, t in run["buckets"]) / run["tokens"] == pytest.approx(run["loss"], rel=1e-6)


@pytest.mark.parametrize("trainer, match", [
    (dict(eval_position_buckets=-1), "trainer.eval_position_buckets"),
    (dict(eval_position_buckets=5), "trainer.eval_position_buckets=5 must divide data.seq_len=48"),
    (dict(eval_every=0), "trainer.eval_position_buckets needs an evaluation"),
    (dict(eval_every=0, eval_position_buckets=0, eval_at_start=True), "trainer.eval_at_start needs"),
])
def test_bad_position_bucket_settings_are_config_errors(trainer, match):
    from pretrain.config import validate_job

    with pytest.raises(ConfigError, match=match):
        validate_job(_job({}, **trainer), world_size=1)
