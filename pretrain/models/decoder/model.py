"""Build the shared Qwen decoder (any family) as megatron-core ``GPTModel`` chunks.

:func:`transformer_config` is the one translation from our configs to megatron-core's ``TransformerConfig``: the
model's shape, then one keyword-only ``apply_<technique>`` step per technique, in a fixed order."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from common.errors import ConfigError
from parallel.layout import ParallelLayout
from parallel.mesh import is_logging_rank
from pretrain.models import rope_embedding
from pretrain.models.config import ModelConfig
from pretrain.models.decoder.loss import DecoderGPTModel
from pretrain.models.decoder.recompute import RecomputeConfig
from pretrain.models.decoder.spec import block_spec

log = logging.getLogger("pretrain")


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
    precision: str = "fp32",
    recompute: RecomputeConfig = RecomputeConfig(),
    kernels: dict | None = None,
    on_cuda: bool = torch.cuda.is_available(),
) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` for ``model`` on a resolved ``layout`` (default: one process): the model's
    shape, then one named step per technique, in this order. Each step returns the megatron fields it sets (no
    two steps set the same field) and logs, on the logging rank, one line of what it applied.

    ``moe_dispatcher``: ``parallel.moe_dispatcher``; ``precision``: ``trainer.precision``; ``recompute``:
    ``TrainerConfig.recompute_config``; ``kernels``: :func:`resolve_kernels`'s knobs (default: all off).
    """
    layout = layout or ParallelLayout.single()
    fields: dict = {}

    def add(step: dict) -> None:
        if clash := fields.keys() & step.keys():
            raise RuntimeError(f"two transformer_config steps set {sorted(clash)}")
        fields.update(step)

    add(shape_fields(model))  # the architecture: layers, widths, heads, norms, switches
    add(apply_layout(layout=layout))  # TP, SP, PP, VPP, CP, EP, ETP degrees (the process groups exist already)
    if model.is_moe:
        add(apply_moe_routing(model, dispatcher=moe_dispatcher))
        # After the layout: the coefficients compensate for how the layout splits the router's tokens.
        add(apply_moe_loss_scaling(model, layout=layout))
    add(apply_precision(precision=precision))
    add(apply_recompute(recompute=recompute))
    add(apply_kernels(**(kernels or {}), moe=model.is_moe, on_cuda=on_cuda))
    return TransformerConfig(**fields)


def _applied(what: str, text: str) -> None:
    """One line per step, on the logging rank only (every rank applies the same)."""
    if is_logging_rank():
        log.info("%s: %s", what, text)


def shape_fields(model: ModelConfig) -> dict:
    """The model's shape and architecture switches (no technique)."""
    return dict(
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
    )


def apply_layout(*, layout: ParallelLayout) -> dict:
    """Tensor, sequence, pipeline (+ virtual), context, expert and expert-tensor parallelism: the resolved degrees,
    as ``parallel.mesh.init_distributed`` built megatron-core's process groups from them."""
    _applied("layout", f"tp={layout.tp} sp={'on' if layout.sequence_parallel else 'off'} pp={layout.pp} "
                       f"vpp={layout.vpp} cp={layout.cp} ep={layout.ep} etp={layout.etp} dp={layout.dp}")
    return dict(
        tensor_model_parallel_size=layout.tp,
        sequence_parallel=layout.sequence_parallel,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        # Context parallel: megatron-core slices RoPE and the pipeline buffers per cp rank and reduces
        # gradients over dp × cp; the attention itself is our SDPAttention (its own needs TransformerEngine).
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def apply_moe_routing(model: ModelConfig, *, dispatcher: str) -> dict:
    """Routed experts (+ shared expert), the router's softmax and load-balancing scope, the token dispatcher."""
    balancing = "global_aux_loss" if model.moe_load_balancing == "global_batch" else "aux_loss"
    _applied("MoE routing", f"{model.num_experts} experts, top-{model.moe_topk}, "
                            f"{'shared expert, ' if model.shared_expert_ffn_hidden_size else ''}{balancing}, "
                            f"{dispatcher} dispatcher")
    return dict(
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
        moe_router_load_balancing_type=balancing,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=dispatcher,
    )


def apply_moe_loss_scaling(model: ModelConfig, *, layout: ParallelLayout) -> dict:
    """The load-balancing and z-loss coefficients, times the number of shards the layout cuts each rank's router
    tokens into, so their gradients equal one process's (logged values are divided by the same coefficient)."""
    # With per-token loss (calculate_per_token_loss, what TrainModule uses) megatron-core 0.16.1 weights
    # each context-parallel rank's share of the load-balancing and z losses by its own token count,
    # seq/cp: their gradients came out cp times smaller than in one process (measured: ep2-cp2 vs one
    # process). Its legacy path multiplies by cp instead; here the coefficients do.
    # Sequence parallel shards the router's tokens over tp the same way: TopKRouter.
    # attach_and_log_load_balancing_loss scales each rank's partial loss (already summed over the
    # tp × cp group by get_tokens_per_expert_and_token_count) by its local seq/(tp·cp) tokens, and
    # apply_z_loss divides the coefficient by the tp × cp group size before scaling by the local
    # tokens, so both gradients come out tp·cp times too small. Measured, moe-tp2-sp vs one process:
    # weights 2.7e-3 apart after 3 steps (grad norm 1e-3 relative) without the tp factor, <1e-5 with
    # it. (MoE with tp > 1 trains only with sequence parallel: megatron's MoELayer.forward refuses it.)
    token_shards = layout.cp * (layout.tp if layout.sequence_parallel else 1)
    # global_aux_loss reduces its counts and token total over tp × dp × cp, so each rank's loss is a 1/dp
    # partial too, and the gradient came out dp times too small (measured, 2-rank dp vs the hand-computed
    # loss: tests/models/test_global_aux_loss.py): its coefficient takes the dp factor as well.
    if model.moe_load_balancing == "global_batch":
        token_shards *= layout.dp
    z_loss = model.moe_z_loss_coeff * token_shards if model.moe_z_loss_coeff is not None else None
    _applied("MoE loss scaling", f"aux {model.moe_aux_loss_coeff:g} x {token_shards} token shards"
                                 + (f", z-loss {model.moe_z_loss_coeff:g} x {token_shards}" if z_loss is not None else ""))
    return dict(moe_aux_loss_coeff=model.moe_aux_loss_coeff * token_shards, moe_z_loss_coeff=z_loss)


def apply_precision(*, precision: str) -> dict:
    """Parameter, activation and pipeline-message dtype (``trainer.precision``); with bf16 the build wraps the
    chunks in ``Float16Module`` and the optimizer keeps fp32 master weights."""
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    _applied("precision", "bf16 weights and activations, fp32 master weights and gradient reduction" if bf16
             else "fp32")
    return dict(bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype)


def apply_recompute(*, recompute: RecomputeConfig) -> dict:
    """Activation recompute (``trainer.recompute*`` as one ``RecomputeConfig``)."""
    _applied("activation recompute", recompute.describe())
    return recompute.megatron_fields()


def apply_kernels(*, fused_swiglu: bool = False, cross_entropy: str = "megatron", moe_grouped_gemm: bool = False,
                  moe: bool = False, on_cuda: bool = torch.cuda.is_available()) -> dict:
    """Fused kernels (``trainer.fused_swiglu`` / ``cross_entropy`` / ``moe_grouped_gemm``, resolved by
    :func:`resolve_kernels`) and the device's own switches."""
    _applied("kernels", f"fused SwiGLU {'on' if fused_swiglu else 'off'}, cross-entropy {cross_entropy}"
                        + (f", MoE grouped GEMM {'on' if moe_grouped_gemm else 'off'}" if moe else ""))
    fields = dict(
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
    )
    if moe:
        # GroupedMLP (TEGroupedMLP needs TransformerEngine)
        fields |= dict(moe_grouped_gemm=moe_grouped_gemm, moe_use_legacy_grouped_gemm=moe_grouped_gemm)
    return fields


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

