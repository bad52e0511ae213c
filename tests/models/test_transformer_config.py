"""``transformer_config``: the model's shape, then one named step per technique, each logging one line.

No process group: the steps only build megatron-core's ``TransformerConfig`` (the groups are used when the
chunks are built). The figures here are the ones the layout tests train with (tests/parallel/test_layouts.py).
"""
from __future__ import annotations

import logging

import pytest

from common.errors import ConfigError
from parallel.config import ParallelConfig
from parallel.layout import ParallelLayout
from pretrain.config import TrainerConfig
from pretrain.models.config import ModelConfig
from pretrain.models.decoder.model import transformer_config
from pretrain.models.decoder.recompute import RecomputeConfig

DENSE = ModelConfig()
MOE = ModelConfig(num_experts=4, moe_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)


def _layout(world_size: int, **parallel) -> ParallelLayout:
    return ParallelLayout.resolve(ParallelConfig(**parallel), world_size=world_size)


def test_each_step_logs_one_line_in_order(caplog):
    caplog.set_level(logging.INFO, logger="pretrain")
    transformer_config(MOE, layout=_layout(4, tp=2, sequence_parallel=True, ep=2, etp=1), precision="bf16",
                       recompute=RecomputeConfig(mode="selective", modules=("core_attn", "mlp")),
                       kernels=dict(fused_swiglu=True, cross_entropy="fused", moe_grouped_gemm=False))
    lines = [r.getMessage() for r in caplog.records if r.name == "pretrain"]
    assert lines == [
        "layout: tp=2 sp=on pp=1 vpp=1 cp=1 ep=2 etp=1 dp=2",
        "MoE routing: 4 experts, top-2, aux_loss, alltoall dispatcher",
        "MoE loss scaling: aux 0.01 x 2 token shards, z-loss 0.001 x 2",
        "precision: bf16 weights and activations, fp32 master weights and gradient reduction",
        "activation recompute: selective (core_attn, mlp)",
        "kernels: fused SwiGLU on, cross-entropy fused, MoE grouped GEMM off",
    ]
    caplog.clear()
    transformer_config(DENSE)  # a dense model: no MoE steps
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "pretrain"] == [
        "layout", "precision", "activation recompute", "kernels"]


def test_the_layout_reaches_megatron_resolved():
    config = transformer_config(MOE, layout=_layout(8, tp=2, pp=2, vpp=2, sequence_parallel=True, ep=2))
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
            config.virtual_pipeline_model_parallel_size, config.expert_model_parallel_size) == (2, 2, 2, 2)
    assert config.expert_tensor_parallel_size == 2 and config.sequence_parallel  # etp null -> tp
    assert transformer_config(DENSE).virtual_pipeline_model_parallel_size is None  # vpp 1: megatron's None


@pytest.mark.parametrize("parallel, world_size, balancing, shards", [
    (dict(), 1, "micro_batch", 1),
    (dict(tp=2), 2, "micro_batch", 1),  # without sp every tp rank routes all tokens
    (dict(tp=2, sequence_parallel=True), 2, "micro_batch", 2),
    (dict(tp=2, sequence_parallel=True, cp=2), 4, "micro_batch", 4),
    (dict(cp=2), 4, "global_batch", 4),  # cp 2 x dp 2: global_aux_loss reduces over dp as well
    (dict(), 2, "global_batch", 2),
])
def test_moe_loss_coefficients_scale_with_the_token_shards(parallel, world_size, balancing, shards):
    import dataclasses

    model = dataclasses.replace(MOE, moe_load_balancing=balancing)
    config = transformer_config(model, layout=_layout(world_size, **parallel))
    assert config.moe_aux_loss_coeff == pytest.approx(0.01 * shards)
    assert config.moe_z_loss_coeff == pytest.approx(0.001 * shards)


def test_recompute_is_one_config_built_from_the_trainer_fields():
    trainer = TrainerConfig(recompute="full", recompute_method="block", recompute_num_layers=2)
    assert trainer.recompute_config == RecomputeConfig(mode="full", modules=("core_attn",), method="block",
                                                       num_layers=2)
    config = transformer_config(DENSE, recompute=trainer.recompute_config)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "block", 2)
    selective = transformer_config(DENSE, recompute=TrainerConfig(recompute="selective",
                                                                  recompute_modules=["mlp"]).recompute_config)
    assert (selective.recompute_granularity, selective.recompute_modules) == ("selective", ["mlp"])
    assert transformer_config(DENSE).recompute_granularity is None
    # The checks still name the fields a user types.
    with pytest.raises(ConfigError, match="trainer.recompute_num_layers must be >= 1"):
        TrainerConfig(recompute_num_layers=0)
    with pytest.raises(ConfigError, match="trainer.recompute=selective needs at least one entry"):
        TrainerConfig(recompute="selective", recompute_modules=[])


def test_train_modules_share_one_interface_with_their_checkpoint_state():
    from pretrain import checkpoint
    from pretrain.checkpoint import DeepSpeedState, TorchDistState
    from pretrain.deepspeed_module import DeepSpeedTrainModule
    from pretrain.train_module import BaseTrainModule, TrainModule

    assert issubclass(TrainModule, BaseTrainModule) and issubclass(DeepSpeedTrainModule, BaseTrainModule)
    with pytest.raises(TypeError, match="checkpoint_state"):
        type("Incomplete", (BaseTrainModule,), {"train_batch": None, "evaluate_by_position": None})()
    fake = type("Fake", (), {"zero": 3})()
    assert DeepSpeedState(fake).zero == 3 and TorchDistState(fake).zero is None  # what check_resumable is given
    source = open(checkpoint.__file__).read()  # the checkpointer asks the interface, it does not probe
    assert '"engine")' not in source and "getattr(train_module" not in source
