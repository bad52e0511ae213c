"""Bad configs fail with one ConfigError naming the field, before any process group exists."""
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from common.errors import ConfigError
from pretrain.config import JobConfig, register_configs, validate_job
from pretrain.data import Shards

register_configs()


def job(*overrides: str) -> JobConfig:
    with initialize_config_module(config_module="conf", version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def test_default_config_composes_to_typed_objects():
    j = job()
    assert isinstance(j, JobConfig)
    assert (j.parallel.tp, j.model.name, j.model.rope_base) == (2, "qwen2_tiny", 1e6)
    assert validate_job(j, world_size=2).dp == 1


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["parallel.tp=3"], 3, "does not divide the model's 4 attention heads"),
        (["parallel.tp=4"], 4, "does not divide the model's 2 key/value heads"),
        (["parallel=single", "parallel.pp=3"], 3, "parallel.pp=3 does not divide the model's 4 layers"),
        (["parallel=pp2_interleaved", "model.num_layers=6"], 2, "parallel.pp × parallel.vpp = 2 × 2 does not divide"),
        (["parallel=tp2"], 3, "world size 3 is not divisible by parallel.tp × parallel.pp"),
        (["parallel=tp2", "parallel.dp=2"], 2, "but the world size is 2"),
        (["parallel=ep2"], 2, "needs a MoE model"),
        (["parallel=ep2", "model=qwen2_moe_tiny", "model.num_experts=3", "model.moe_topk=1"], 2,
         "parallel.ep=2 does not divide the model's 3 experts"),
        (["parallel=tp2", "model=qwen2_moe_tiny"], 2, "with a MoE model needs parallel.sequence_parallel=true"),
        (["parallel=single", "parallel.zero=2"], 1, "it needs dp >= 2"),
        (["trainer.global_batch_size=6", "trainer.micro_batch_size=4"], 2, "trainer.global_batch_size=6"),
        (["data.seq_len=2048"], 2, "exceeds model.max_seq_len"),
    ],
)
def test_invalid_layouts_are_refused_with_the_field_named(overrides, world_size, message):
    with pytest.raises(ConfigError, match=None) as err:
        validate_job(job(*overrides), world_size=world_size)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.sequence_parallel=true", "parallel.tp=1"], "parallel.sequence_parallel needs parallel.tp > 1"),
        (["parallel.zero=2"], "DeepSpeed, which serves data-parallel layouts only"),
        (["parallel.zero=5"], "parallel.zero must be one of"),
        (["model.num_kv_heads=3"], "model.num_heads=4 is not a multiple of model.num_kv_heads=3"),
        (["trainer.precision=fp16"], "trainer.precision must be one of"),
        (["optim.lr=-1"], "optim.lr must be positive"),
        (["data.weights=[1.0,2.0]"], "data.weights has 2 entries but data.paths has 1"),
    ],
)
def test_section_checks_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        job(*overrides)
    assert message in str(err.value)


def test_deepspeed_zero_trains_but_refuses_async_save():
    assert validate_job(job("parallel=zero3"), world_size=2).dp == 2  # the training CLI runs ZeRO-2/3 ...
    with pytest.raises(ConfigError, match="trainer.async_save=true is not supported with parallel.zero=3"):
        validate_job(job("parallel=zero3", "trainer.async_save=true"), world_size=2)  # ... but writes synchronously


def test_missing_data_path_is_a_config_error(tmp_path):
    j = job(f"data.paths=[{tmp_path / 'nowhere'}]")
    with pytest.raises(ConfigError, match=r"data.paths\[0\]=.*has no manifest.json: run `python -m data_pipeline`"):
        Shards.from_config(j.data)


def test_every_preset_composes_and_matches_published_sizes():
    from pretrain.models.decoder.flops import param_count

    published = {  # billions (total, active) from the Qwen2 / Qwen1.5-MoE model cards
        "qwen2_0_5b": (0.494, 0.494),
        "qwen2_1_5b": (1.544, 1.544),
        "qwen2_7b": (7.616, 7.616),
        "qwen2_72b": (72.71, 72.71),
        "qwen2_57b_a14b": (57.41, 14.25),
        "qwen1_5_moe_a2_7b": (14.32, 2.69),
    }
    for name, (total, active) in published.items():
        count = param_count(job(f"model={name}").model)
        assert count.total / 1e9 == pytest.approx(total, rel=2e-3), name
        assert count.active / 1e9 == pytest.approx(active, rel=2e-3), name
