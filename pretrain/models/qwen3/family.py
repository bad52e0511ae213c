"""The Qwen3 family (Qwen3 dense, Qwen3-MoE): the shared decoder with QK-norm, no QKV bias, its own head width,
normalised top-k and no shared expert -- all ModelConfig switches -- and its own Hugging Face configs."""
from pretrain.models.decoder import flops
from pretrain.models.qwen3 import hf_config
from pretrain.models.registry import ModelFamily

FAMILY = ModelFamily(
    name="qwen3",
    hf_model_types=hf_config.MODEL_TYPES,
    config_from_hf=hf_config.model_config_from_hf,
    config_to_hf=hf_config.hf_config_from_model,
    decoder="pretrain.models.decoder.model",  # the shared megatron decoder
    state_dict_adapter="pretrain.models.qwen2.state_dict",  # Qwen2's key names, plus q_norm/k_norm
    param_count=flops.param_count,
    flops_per_token=flops.flops_per_token,
)
