"""Layouts that cannot run are refused with a ConfigError naming the field, before any process group starts.

Complements tests/pretrain/test_config.py (which goes through Hydra with the tiny presets): here the
checks run on ``ParallelConfig``, ``ParallelLayout`` and ``validate_job`` directly, with the shapes of real Qwen2 presets.
"""
from __future__ import annotations

import pytest
import torch.distributed as dist

from common.errors import ConfigError
from parallel.config import ParallelConfig
from parallel.launch import local_world_size
from parallel.layout import ParallelLayout
from pretrain.config import DataConfig, JobConfig, TrainerConfig, WandbConfig, validate_job
from pretrain.models.config import ModelConfig

# Shapes as in the HF config.json of each model (NOTES.md table).
QWEN2_0_5B = dict(num_layers=24, num_heads=14, num_kv_heads=2, num_experts=None)
QWEN2_7B = dict(num_layers=28, num_heads=28, num_kv_heads=4, num_experts=None)
QWEN1_5_MOE = dict(num_layers=24, num_heads=16, num_kv_heads=16, num_experts=60)


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(vpp=2), "parallel.vpp=2 needs parallel.pp > 1"),
        (dict(zero=2, pp=2), "parallel.zero=2 runs through DeepSpeed, which serves data-parallel layouts only"),
        (dict(zero=3, ep=2), "parallel.zero=3 runs through DeepSpeed, which serves data-parallel layouts only"),
        (dict(zero=3, tp=2), "got tp=2, pp=1, ep=1"),
        (dict(offload_optimizer=True), "parallel.offload_optimizer=true needs parallel.zero=2 or 3"),
        (dict(zero=0, offload_optimizer=True), "got parallel.zero=0"),
        (dict(tp=0), "parallel.tp must be an integer >= 1"),
        (dict(dp=0), "parallel.dp must be >= 1, or -1"),
        (dict(cp=0), "parallel.cp must be an integer >= 1"),
        # DeepSpeed would average over cp ranks as if they were replicas
        (dict(zero=2, cp=2), "got tp=1, pp=1, ep=1, cp=2"),
    ],
)
def test_layout_refused_on_its_own(layout, message):
    with pytest.raises(ConfigError) as err:
        ParallelConfig(**layout)
    assert message in str(err.value)


@pytest.mark.parametrize("zero", [2, 3])
def test_offload_is_accepted_with_deepspeed_stages(zero):
    p = ParallelConfig(zero=zero, offload_optimizer=True)
    layout = ParallelLayout.resolve(p, world_size=4).check_model(seq_len=4096, **QWEN2_7B)
    assert layout.dp == 4
    assert "offload" in layout.describe()


@pytest.mark.parametrize(
    "layout, world_size, shape, seq_len, message",
    [
        # tensor parallel must split whole heads and whole GQA groups
        (dict(tp=4), 4, QWEN2_0_5B, 4096, "parallel.tp=4 does not divide the model's 14 attention heads"),
        (dict(tp=7), 7, QWEN2_7B, 4096, "parallel.tp=7 does not divide the model's 4 key/value heads"),
        # pipeline stages and virtual stages must split whole layers
        (dict(pp=8), 8, QWEN2_7B, 4096, "parallel.pp=8 does not divide the model's 28 layers"),
        (dict(pp=2, vpp=4), 2, QWEN2_7B, 4096, "parallel.pp × parallel.vpp = 2 × 4 does not divide the model's 28"),
        # experts
        (dict(ep=8), 8, QWEN1_5_MOE, 4096, "parallel.ep=8 does not divide the model's 60 experts"),
        (dict(tp=2, ep=4, etp=2), 4, QWEN1_5_MOE, 4096, "parallel.ep × expert tp = 4 × 2 must divide"),
        # degrees against the world size
        (dict(tp=2, pp=2), 2, QWEN2_7B, 4096, "world size 2 is not divisible by parallel.tp × parallel.pp"),
        (dict(tp=2, pp=2, dp=2), 4, QWEN2_7B, 4096, "= 8 processes, but the world size is 4"),
        (dict(tp=4, dp=1), 8, QWEN2_7B, 4096, "= 4 processes, but the world size is 8"),
        # sequence parallel shards the sequence over the TP group
        (dict(tp=4, sequence_parallel=True), 4, QWEN2_7B, 4098, "sequence length 4098 is not divisible by parallel.tp=4"),
        # DeepSpeed ZeRO-2/3 shard over data-parallel ranks
        (dict(zero=3), 1, QWEN2_7B, 4096, "parallel.zero=3 shards over data-parallel ranks; it needs dp >= 2"),
        # context parallel: 2 × cp equal chunks per sequence, and cp ranks count in the world size
        (dict(cp=4), 4, QWEN2_7B, 4100, "sequence length 4100 is not divisible by 2 × parallel.cp = 8"),
        (dict(cp=2), 3, QWEN2_7B, 4096, "world size 3 is not divisible by parallel.tp × parallel.pp × parallel.cp"),
        (dict(tp=2, cp=2, dp=2), 4, QWEN2_7B, 4096, "= 2 × 1 × 2 × 2 = 8 processes, but the world size is 4"),
        # with sequence parallel each cp rank's seq / cp tokens are split over tp: 4100 / 2 = 2050, odd
        (dict(tp=4, cp=2, sequence_parallel=True), 8, QWEN2_7B, 4100, "sequence length / parallel.cp = 4100 / 2"),
        # experts spread over tp × cp × dp = 2 ranks: ep=4 does not fit
        (dict(cp=2, ep=4), 2, QWEN1_5_MOE, 4096, "must divide parallel.tp × parallel.cp × dp = 1 × 2 × 1"),
    ],
)
def test_layout_refused_against_model_and_world(layout, world_size, shape, seq_len, message):
    with pytest.raises(ConfigError) as err:
        ParallelLayout.resolve(ParallelConfig(**layout), world_size=world_size).check_model(seq_len=seq_len, **shape)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "layout, world_size, shape",
    [
        (dict(tp=2, pp=2, vpp=2), 8, QWEN2_0_5B),  # 24 layers = 2 × 2 × 6, dp 2
        (dict(tp=4, sequence_parallel=True), 8, QWEN2_7B),
        (dict(ep=4, tp=2, etp=1), 8, QWEN1_5_MOE),  # experts over tp × dp = 8 ranks
        (dict(zero=2), 2, QWEN2_7B),
        (dict(tp=2, cp=2, sequence_parallel=True), 8, QWEN2_7B),  # 4096 / 2 per cp rank, / 2 per tp rank
        (dict(cp=4, ep=4), 8, QWEN1_5_MOE),  # experts over tp × cp × dp = 1 × 4 × 2 ranks
    ],
)
def test_valid_layouts_pass(layout, world_size, shape):
    p = ParallelConfig(**layout)
    layout = ParallelLayout.resolve(p, world_size=world_size).check_model(seq_len=4096, **shape)
    assert layout.dp == world_size // (p.tp * p.pp * p.cp)


def test_context_parallel_world_size_and_description():
    p = ParallelConfig(tp=2, cp=2)
    assert local_world_size(p) == 4 and ParallelLayout.resolve(p, world_size=8).dp == 2
    assert ParallelLayout.resolve(p, world_size=8).describe() == "tp=2 pp=1 cp=2 dp=2 zero=1"
    # a bare MoE launch starts enough ranks for the expert groups, counting cp ranks: tp × cp × dp >= ep
    assert local_world_size(ParallelConfig(cp=2, ep=4)) == 4


def test_context_parallel_needs_the_sdpa_attention():
    job = JobConfig(model=ModelConfig(num_layers=4, attention_backend="local"), data=DataConfig(seq_len=64),
                    parallel=ParallelConfig(cp=2), trainer=TrainerConfig(wandb=WandbConfig(mode="disabled")))
    with pytest.raises(ConfigError, match="parallel.cp=2 needs model.attention_backend=sdpa"):
        validate_job(job, world_size=2)
    job.model.attention_backend = "auto"
    assert validate_job(job, world_size=2).dp == 1


def _job(parallel: ParallelConfig, **trainer) -> JobConfig:
    return JobConfig(model=ModelConfig(num_layers=4), data=DataConfig(seq_len=64), parallel=parallel,
                     trainer=TrainerConfig(wandb=WandbConfig(mode="disabled"), **trainer))


def test_interleaved_schedule_needs_microbatches_in_multiples_of_pp():
    # 8 sequences / (2 per microbatch × dp 2) = 2 microbatches; pp=2 ok, but with dp=4: 1 microbatch.
    ok = _job(ParallelConfig(pp=2, vpp=2), global_batch_size=8, micro_batch_size=2)
    assert validate_job(ok, world_size=4).dp == 2
    with pytest.raises(ConfigError, match="multiple of parallel.pp=2"):
        validate_job(_job(ParallelConfig(pp=2, vpp=2), global_batch_size=8, micro_batch_size=2), world_size=8)


def test_refused_before_any_process_group(tmp_path, monkeypatch):
    """The training entry point validates before it starts a process group (or reads data)."""
    from pretrain import __main__ as entry

    def forbidden(*args, **kwargs):
        raise AssertionError("init_process_group called for a layout that should have been refused")

    monkeypatch.setattr(dist, "init_process_group", forbidden)
    monkeypatch.setenv("WORLD_SIZE", "3")
    job = _job(ParallelConfig(tp=3))  # 4 heads
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide the model's 4 attention heads"):
        entry.run(job, tmp_path)
    assert not dist.is_initialized()
