"""Build the shared Qwen decoder (any family) as megatron-core ``GPTModel`` chunks: the one translation from our config to megatron's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from common.errors import ConfigError
from parallel.layout import ParallelLayout
from pretrain.models import rope_embedding
from pretrain.models.config import ModelConfig
from pretrain.models.decoder.loss import DecoderGPTModel
from pretrain.models.decoder.spec import block_spec


def padded_vocab_size(model: ModelConfig, tokenizer_vocab: int | None, tp: int) -> int:
    """Embedding rows: the preset's fixed size, or the tokenizer's padded to a multiple of pad × tp."""
    if model.vocab_size is not None:
        if tokenizer_vocab is not None and tokenizer_vocab > model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens"
            )
        return model.vocab_size
    if tokenizer_vocab is None:
        raise ConfigError("model.vocab_size is null and no tokenizer size is known (data manifest missing)")
    multiple = model.pad_vocab_multiple * tp
    return -(-tokenizer_vocab // multiple) * multiple


def transformer_config(
    model: ModelConfig,
    *,
    layout: ParallelLayout | None = None,
    moe_dispatcher: str = "alltoall",
    bf16: bool = False,
    recompute: str = "none",
    recompute_modules: tuple[str, ...] = ("core_attn",),
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
    fused_swiglu: bool = False,
    cross_entropy: str = "megatron",
    moe_grouped_gemm: bool = False,
    on_cuda: bool = torch.cuda.is_available(),
) -> TransformerConfig:
    """Map a model shape, a resolved parallel layout (default: one process), activation recompute
    (``trainer.recompute*``) and the kernel knobs (resolved by :func:`resolve_kernels`) onto megatron-core's
    ``TransformerConfig``."""
    layout = layout or ParallelLayout.single()
    tp, cp, sequence_parallel = layout.tp, layout.cp, layout.sequence_parallel
    moe = {}
    if model.is_moe:
        # With per-token loss (calculate_per_token_loss, what TrainModule uses) megatron-core 0.16.1 weights
        # each context-parallel rank's share of the load-balancing and z losses by its own token count,
        # seq/cp: their gradients came out cp times smaller than in one process (measured: ep2-cp2 vs one
        # process). Its legacy path multiplies by cp instead; here the coefficients do (logged values are
        # divided by the same coefficient, so they are unchanged).
        # Sequence parallel shards the router's tokens over tp the same way: TopKRouter.
        # attach_and_log_load_balancing_loss scales each rank's partial loss (already summed over the
        # tp × cp group by get_tokens_per_expert_and_token_count) by its local seq/(tp·cp) tokens, and
        # apply_z_loss divides the coefficient by the tp × cp group size before scaling by the local
        # tokens, so both gradients come out tp·cp times too small. Measured, moe-tp2-sp vs one process:
        # weights 2.7e-3 apart after 3 steps (grad norm 1e-3 relative) without the tp factor, <1e-5 with
        # it. (MoE with tp > 1 trains only with sequence parallel: megatron's MoELayer.forward refuses it.)
        token_shards = cp * (tp if sequence_parallel else 1)
        # global_aux_loss reduces its counts and token total over tp × dp × cp, so each rank's loss is a 1/dp
        # partial too, and the gradient came out dp times too small (measured, 2-rank dp vs the hand-computed
        # loss: tests/models/test_global_aux_loss.py): its coefficient takes the dp factor as well.
        if model.moe_load_balancing == "global_batch":
            token_shards *= layout.dp
        moe = dict(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=model.shared_expert_ffn_hidden_size,
            moe_shared_expert_gate=model.shared_expert_ffn_hidden_size is not None,
            # Qwen2-MoE: softmax over all experts, then top-k, weights not renormalised (norm_topk_prob=false).
            # Qwen3-MoE (norm_topk_prob=true): softmax over the top-k logits, which equals the top-k of the full
            # softmax renormalised to sum to 1 (the same experts: softmax is monotonic).
            moe_router_pre_softmax=not model.moe_norm_topk,
            # global_aux_loss: expert counts summed over tp × dp × cp and averaged over the step's micro-batches
            # so far (reset in finalize_model_grads); aux_loss: this micro-batch's counts over tp × cp.
            moe_router_load_balancing_type="global_aux_loss" if model.moe_load_balancing == "global_batch"
            else "aux_loss",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff * token_shards,
            moe_z_loss_coeff=model.moe_z_loss_coeff * token_shards if model.moe_z_loss_coeff is not None else None,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type=moe_dispatcher,
            moe_grouped_gemm=moe_grouped_gemm,
            moe_use_legacy_grouped_gemm=moe_grouped_gemm,  # GroupedMLP (TEGroupedMLP needs TransformerEngine)
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_heads,
        num_query_groups=model.num_kv_heads,
        kv_channels=model.head_dim,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_norm,  # also makes finalize_model_grads sum the q/k norm grads over tp
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        # Context parallel: megatron-core slices RoPE and the pipeline buffers per cp rank and reduces
        # gradients over dp × cp; the attention itself is our SDPAttention (its own needs TransformerEngine).
        context_parallel_size=layout.cp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Kernels that need apex/TransformerEngine are off; torch SDPA and fused AdamW stand in. megatron-core's
        # own SwiGLU and cross-entropy fusions are torch.compile'd and need neither.
        bias_activation_fusion=fused_swiglu,
        cross_entropy_loss_fusion=cross_entropy == "fused",
        cross_entropy_fusion_impl="native",
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        use_cpu_initialization=not on_cuda,
        # gloo matches batched p2p messages in posting order, which corrupts interleaved pipelines.
        batch_p2p_comm=on_cuda,
        **_recompute_fields(recompute, recompute_modules, recompute_method, recompute_num_layers),
        **moe,
    )


def _recompute_fields(recompute: str, modules, method: str, num_layers: int) -> dict:
    """megatron-core's recompute fields. Both granularities rerun layers through ``tensor_parallel.checkpoint``,
    which saves and restores the RNG tracker's states (routed to the CPU generator by the CPU seam), so dropout
    replays identically. Recompute runs in training only: evaluation (eval mode) stores nothing anyway."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(modules))
    return dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=num_layers)


def resolve_kernels(trainer, *, on_cuda: bool = torch.cuda.is_available()) -> dict:
    """``trainer.fused_swiglu`` / ``cross_entropy`` / ``moe_grouped_gemm`` with auto (null) resolved: the fast
    paths on CUDA, the fused cross-entropy and grouped GEMM with bf16 only (their kernels are bf16)."""
    bf16 = trainer.precision == "bf16"
    ce = trainer.cross_entropy
    if ce == "auto":
        ce = "fused" if on_cuda and bf16 else "megatron"
    return dict(
        fused_swiglu=on_cuda if trainer.fused_swiglu is None else trainer.fused_swiglu,
        cross_entropy=ce,
        moe_grouped_gemm=on_cuda and bf16 if trainer.moe_grouped_gemm is None else trainer.moe_grouped_gemm,
    )


def build_model_chunks(model: ModelConfig, config: TransformerConfig, vocab_size: int, *,
                       cross_entropy_chunk: int = 0) -> list[GPTModel]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), on the current device.
    ``cross_entropy_chunk`` > 0: the loss goes through :func:`loss.chunked_linear_cross_entropy`."""
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        chunk = DecoderGPTModel(
            cross_entropy_chunk=cross_entropy_chunk,
            config=config,
            transformer_layer_spec=block_spec(model, config, vp_stage if vpp > 1 else None),
            vocab_size=vocab_size,
            max_sequence_length=model.max_seq_len,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rope_base,
            vp_stage=vp_stage if vpp > 1 else None,
        )
        rope_embedding.install(chunk, dim=model.head_dim, base=model.rope_base, scaling=model.rope_scaling)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks

