"""The Qwen2 family (Qwen2, Qwen2.5, Qwen1.5/Qwen2-MoE) as the registry sees it."""
from pretrain.models.qwen2 import flops, hf_adapter, model
from pretrain.models.qwen2.config import ModelConfig
from pretrain.models.registry import ModelFamily

FAMILY = ModelFamily(
    name="qwen2",
    hf_model_types=("qwen2", "qwen2_moe"),
    config_cls=ModelConfig,
    config_from_hf=hf_adapter.model_config_from_hf,
    config_to_hf=hf_adapter.hf_config_from_model,
    build_model_chunks=model.build_model_chunks,
    transformer_config=model.transformer_config,
    state_dict_adapter="pretrain.models.qwen2.hf_adapter",
    param_count=flops.param_count,
    flops_per_token=flops.flops_per_token,
)
