"""The Qwen2 family (Qwen2, Qwen2.5, Qwen1.5/Qwen2-MoE) as the registry sees it."""
from pretrain.models.decoder import flops
from pretrain.models.qwen2 import hf_config
from pretrain.models.registry import ModelFamily

FAMILY = ModelFamily(
    name="qwen2",
    hf_model_types=hf_config.MODEL_TYPES,
    config_from_hf=hf_config.model_config_from_hf,
    config_to_hf=hf_config.hf_config_from_model,
    decoder="pretrain.models.decoder.model",  # the shared megatron decoder
    state_dict_adapter="pretrain.models.qwen2.state_dict",
    param_count=flops.param_count,
    flops_per_token=flops.flops_per_token,
)
