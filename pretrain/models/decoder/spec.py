"""megatron-core module specs for the Qwen decoder (every family; its switches pick the variant): which class implements each part of a layer."""
from __future__ import annotations

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from pretrain.models.config import ModelConfig
from pretrain.models.decoder.layers import RMSNorm, SDPAttention


def layer_spec(model: ModelConfig, *, grouped_experts: bool = False) -> ModuleSpec:
    """One Qwen decoder layer: pre-norm GQA self-attention (QK-norm with ``model.qk_norm``), then a pre-norm SwiGLU MLP or MoE block
    (experts: megatron-core's SequentialMLP, or GroupedMLP on torch's grouped GEMM with ``grouped_experts``)."""
    backend = LocalSpecProvider()
    core_attention = DotProductAttention if model.attention_backend == "local" else SDPAttention
    if model.is_moe:
        if grouped_experts:
            from pretrain.models.decoder import grouped_gemm

            grouped_gemm.install()
        # The local backend's grouped module is the "legacy" GroupedMLP (TEGroupedMLP needs TransformerEngine).
        mlp = get_moe_module_spec_for_backend(backend=backend, num_experts=model.num_experts,
                                              moe_grouped_gemm=grouped_experts,
                                              moe_use_legacy_grouped_gemm=grouped_experts)
    else:
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=core_attention,
                    linear_proj=backend.row_parallel_linear(),
                    # Qwen3's QK-norm: RMSNorm over each head's head_dim, before RoPE (megatron applies it there).
                    q_layernorm=RMSNorm if model.qk_norm else IdentityOp,
                    k_layernorm=RMSNorm if model.qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(model: ModelConfig, config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds, plus the final norm (our RMSNorm, so sequence parallel works)."""
    n_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    spec = layer_spec(model, grouped_experts=config.moe_grouped_gemm)
    return TransformerBlockSubmodules(layer_specs=[spec] * n_layers, layer_norm=RMSNorm)
