"""The Qwen decoder shape shared by the families (Qwen2/2.5 and Qwen3, dense and MoE), as in Hugging Face's
config.json; architecture differences are switches here (presets live in conf/model/)."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError, check_choice
from pretrain.models.rope_scaling import RopeScalingConfig


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name: str = "qwen2_tiny"
    """Preset name, used in logs and run names."""
    family: str = "qwen2"
    """Model family (pretrain/models/registry.py): 'qwen2' (Qwen2, Qwen2.5, Qwen1.5/2-MoE) or 'qwen3'
    (Qwen3, Qwen3-MoE). Picks the Hugging Face classes and key names; the switches below pick the architecture."""
    hidden_size: int = 64
    """Width of the residual stream (HF ``hidden_size``)."""
    ffn_hidden_size: int = 176
    """SwiGLU inner width of a dense layer (HF ``intermediate_size``)."""
    num_layers: int = 2
    """Transformer layers (HF ``num_hidden_layers``)."""
    num_heads: int = 4
    """Query heads (HF ``num_attention_heads``)."""
    num_kv_heads: int = 2
    """Key/value heads for grouped-query attention (HF ``num_key_value_heads``)."""
    kv_channels: int | None = None
    """Per-head width (HF ``head_dim``; Qwen3: 128 whatever the hidden size). None = hidden_size / num_heads."""
    qkv_bias: bool = True
    """Biases on the q/k/v projections (Qwen2: true; Qwen3: false, HF ``attention_bias``)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3's ``q_norm``/``k_norm``)."""
    vocab_size: int | None = None
    """Embedding rows. None: the tokenizer's size from the data manifest, padded to ``pad_vocab_multiple``."""
    pad_vocab_multiple: int = 128
    """Pad a tokenizer-derived vocabulary to a multiple of this (times parallel.tp) for fast GEMMs."""
    max_seq_len: int = 4096
    """Longest sequence the RoPE tables are built for (HF ``max_position_embeddings``)."""
    rope_base: float = 1_000_000.0
    """RoPE theta (HF ``rope_theta``)."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """YaRN / dynamic-NTK scaling beyond the trained length (HF ``rope_scaling``; pretrain/models/rope_scaling.py)."""
    rope_change_ok: bool = False
    """Declare that rope_base / rope_scaling differ from what the resumed or ``init_from`` checkpoint was trained
    with (its rope.json); otherwise such a difference is a config error."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (HF ``rms_norm_eps``)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer (Qwen2-0.5B/1.5B: true; 7B/72B: false)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (HF ``initializer_range``)."""
    init_from: str | None = None
    """Start from these weights: a Hugging Face dir (config.json + safetensors) or a torch_dist checkpoint
    (from ``python -m pretrain.convert import``, or another run's: only its model part is read).
    Ignored when the run resumes from its own checkpoint."""
    attention_backend: str = "auto"
    """Core attention: 'sdpa' (torch SDPA: FlashAttention/cuDNN kernels on GPU, flash-attn package if installed),
    'local' (megatron-core's unfused reference), 'auto' = sdpa."""
    # --- MoE (Qwen2-MoE); num_experts None means a dense model ---
    num_experts: int | None = None
    """Routed experts per MoE layer (HF ``num_experts``)."""
    moe_topk: int = 2
    """Experts chosen per token (HF ``num_experts_per_tok``)."""
    moe_ffn_hidden_size: int | None = None
    """SwiGLU inner width of one routed expert (HF ``moe_intermediate_size``)."""
    shared_expert_ffn_hidden_size: int | None = None
    """Inner width of the shared expert (HF ``shared_expert_intermediate_size``); None = no shared expert.
    A shared expert always has its sigmoid gate (Qwen2-MoE's ``shared_expert_gate``)."""
    moe_norm_topk: bool = False
    """Renormalise the top-k routing weights to sum to 1 (HF ``norm_topk_prob``: Qwen3-MoE true, Qwen2-MoE false)."""
    moe_load_balancing: str = "micro_batch"
    """Scope of the load-balancing loss: 'micro_batch' (expert counts of each micro-batch, megatron's
    ``aux_loss``) or 'global_batch' (counts summed over the data-parallel ranks and averaged over the
    micro-batches of the step so far, megatron's ``global_aux_loss``; the Qwen3 report's global-batch balance)."""
    moe_aux_loss_coeff: float = 0.001
    """Load-balancing loss coefficient (HF ``router_aux_loss_coef``)."""
    moe_z_loss_coeff: float | None = None
    """Router z-loss coefficient; None disables it."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        from pretrain.models import registry

        check_choice("model.family", self.family, registry.names())
        if self.kv_channels is not None and (not isinstance(self.kv_channels, int) or self.kv_channels < 1):
            raise ConfigError(f"model.kv_channels must be a positive integer or null, got {self.kv_channels!r}")
        if self.kv_channels is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        check_choice("model.attention_backend", self.attention_backend, ("auto", "sdpa", "local"))
        check_choice("model.moe_load_balancing", self.moe_load_balancing, ("micro_batch", "global_batch"))
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"model.vocab_size must be positive or null, got {self.vocab_size}")
        if self.num_experts is not None:
            if self.num_experts < 1:
                raise ConfigError(f"model.num_experts must be >= 1 or null, got {self.num_experts}")
            if not 1 <= self.moe_topk <= self.num_experts:
                raise ConfigError(
                    f"model.moe_topk={self.moe_topk} must be between 1 and model.num_experts={self.num_experts}"
                )
            if self.moe_ffn_hidden_size is None:
                raise ConfigError("model.moe_ffn_hidden_size is required when model.num_experts is set")

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None
