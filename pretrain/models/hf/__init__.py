"""Hugging Face checkpoints in and out, for every family: safetensors I/O (``checkpoint``), configs dispatched to
the family that owns a ``model_type`` (``configs``), and sharding over any TP/PP/VPP/EP layout through the
family's state-dict adapter (``sharding``)."""
from pretrain.models.hf.checkpoint import (
    ConversionError,
    HFCheckpoint,
    hf_state_dict_from_module,
    load_hf_module_weights,
    save_hf_checkpoint,
)
from pretrain.models.hf.configs import hf_config_from_model, model_config_from_hf
from pretrain.models.hf.sharding import (
    Layout,
    global_from_checkpoint_tensors,
    hf_from_global,
    load_hf_into_chunks,
    local_state_dict,
    megatron_keys,
    to_hf,
    to_megatron,
    unwrap_chunk,
)

__all__ = [
    "ConversionError", "HFCheckpoint", "Layout", "global_from_checkpoint_tensors", "hf_config_from_model",
    "hf_from_global", "hf_state_dict_from_module", "load_hf_into_chunks", "load_hf_module_weights",
    "local_state_dict", "megatron_keys", "model_config_from_hf", "save_hf_checkpoint", "to_hf", "to_megatron",
    "unwrap_chunk",
]
