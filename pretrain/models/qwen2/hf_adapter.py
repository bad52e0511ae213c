"""Qwen2 / Qwen2-MoE weights between Hugging Face and megatron-core, for any TP/PP/VPP/EP layout.

The state-dict adapter of this model (STYLE.md point 3). Two steps, each pure tensor bookkeeping:

1. **HF <-> megatron "global" names**: the keys of a TP=1/PP=1/EP=1 ``GPTModel.state_dict()``, with
   global layer and expert numbers. The tensor transforms all live here:

   ========================================================  ============================================
   megatron (global)                                         Hugging Face (``Qwen2ForCausalLM`` on disk)
   ========================================================  ============================================
   ``embedding.word_embeddings.weight``  [V_m, h]            ``model.embed_tokens.weight`` [V_hf, h]
   ``decoder.layers.{i}.input_layernorm.weight``             ``model.layers.{i}.input_layernorm.weight``
   ``decoder.layers.{i}.self_attention.linear_qkv.weight``   ``...self_attn.{q,k,v}_proj.weight`` fused
     and ``.bias``, rows grouped per query group:            (see below); ``.bias`` likewise
     ``[q heads of group 0, k_0, v_0, q heads of group 1, ...]``
   ``decoder.layers.{i}.self_attention.linear_proj.weight``  ``...self_attn.o_proj.weight``
   ``decoder.layers.{i}.pre_mlp_layernorm.weight``           ``...post_attention_layernorm.weight``
   ``decoder.layers.{i}.mlp.linear_fc1.weight`` [gate; up]   ``...mlp.gate_proj.weight``, ``up_proj``
   ``decoder.layers.{i}.mlp.linear_fc2.weight``              ``...mlp.down_proj.weight``
   ``decoder.layers.{i}.mlp.router.weight``                  ``...mlp.gate.weight``  (MoE)
   ``...mlp.experts.local_experts.{e}.linear_fc1.weight``    ``...mlp.experts.{e}.gate_proj/up_proj.weight``
   ``...mlp.experts.local_experts.{e}.linear_fc2.weight``    ``...mlp.experts.{e}.down_proj.weight``
   ``...mlp.shared_experts.linear_fc1.weight`` [gate; up]    ``...mlp.shared_expert.gate_proj/up_proj.weight``
   ``...mlp.shared_experts.linear_fc2.weight``               ``...mlp.shared_expert.down_proj.weight``
   ``...mlp.shared_experts.gate_weight`` [1, h]              ``...mlp.shared_expert_gate.weight``
   ``decoder.final_layernorm.weight``                        ``model.norm.weight``
   ``output_layer.weight`` [V_m, h] (absent when tied)       ``lm_head.weight`` (absent when tied)
   ========================================================  ============================================

   The megatron QKV layout is the one ``SelfAttention.get_query_key_value_tensors`` splits: the fused
   output is viewed as ``[num_query_groups, (heads_per_group + 2) * head_dim]`` and each group's block
   is ``[its heads_per_group query heads, its key head, its value head]``.

   **Vocabulary padding.** megatron's vocabulary ``V_m`` (``model.padded_vocab_size``) may be larger than
   HF's ``V_hf``. Import appends ``V_m - V_hf`` zero rows to the embedding and the output layer; export
   drops every row past ``hf_vocab_size``. Logits over the real vocabulary are then identical, but the
   padded rows add ``V_m - V_hf`` logits of exactly 0 to megatron's softmax, so megatron's loss is not
   HF's loss until training pushes those logits down (they are never targets). Parity is exact when
   ``V_m == V_hf``, which holds for every Qwen2 preset (151936 = 128 * 1187 and 152064 = 128 * 1188,
   both divisible by any power-of-two TP up to 128, and ``padded_vocab_size`` returns a preset's fixed
   size unpadded). Note that HF's 151936 rows already include ~290 rows beyond the tokenizer's 151646
   tokens: those are exported as they are.

2. **global <-> one rank's shard** (``Layout``): megatron numbers layers locally from 0 on each
   pipeline stage / virtual stage; with ``L`` layers over ``pp * vpp`` chunks of ``n = L / (pp * vpp)``
   layers, chunk ``(pp_rank, vp_stage)`` holds global layers ``[(vp_stage * pp + pp_rank) * n, ... + n)``
   (``get_transformer_layer_offset``). Experts: EP rank ``r`` holds experts ``[r * E / ep, (r + 1) * E / ep)``
   as ``local_experts.0 ...``. Tensor parallelism splits column-parallel weights (QKV weight and bias,
   the vocabulary rows of embedding and output layer) along dim 0 in contiguous chunks -- a contiguous
   chunk of the grouped QKV is whole query groups, hence ``num_kv_heads % tp == 0`` -- row-parallel
   weights (``linear_proj``, ``linear_fc2``) along dim 1, and SwiGLU ``linear_fc1`` as
   ``[gate_chunk_r; up_chunk_r]``. Routed experts split over the expert-tensor-parallel degree ``etp``
   (default ``tp``) instead; the shared expert is an ordinary TP MLP. Norms, router and shared-expert
   gate are replicated. With tied embeddings the last pipeline stage (when it is not also the first)
   holds ``output_layer.weight``, a copy of the embedding.

Semantic differences between megatron-core's MoE (as ``model.transformer_config`` sets it up) and HF
``Qwen2MoeSparseMoeBlock`` -- none of them enters the logits:

* Routing is identical: softmax over all experts in fp32, top-k of the probabilities, weights not
  renormalised (``moe_router_pre_softmax=True`` == HF ``norm_topk_prob=False``); no capacity factor, so no
  token is dropped (``moe_expert_capacity_factor=None``), as in HF. megatron computes the router GEMM
  in fp32 (``moe_router_dtype="fp32"``); HF in the model dtype (the same in fp32, more exact in bf16).
* Load-balancing loss: megatron adds, for each MoE layer ``l`` separately,
  ``coeff * E / (T^2 * k) * sum_e count_{l,e} * prob_{l,e}`` (``switch_load_balancing_loss_func``; count =
  tokens routed to e, prob = summed router probability of e, T tokens, k = top-k) and sums over
  layers. It enters the gradients only (``MoEAuxLossAutoScaler``), never the reported loss.
  HF computes ONE loss over the tokens of all layers concatenated,
  ``E / (T * L)^2 * sum_e count_e * prob_e`` with counts/probs summed over layers (no ``1/k``), adds
  ``router_aux_loss_coef`` times it to the returned loss, and only when ``output_router_logits=True``
  (the config default is False: HF fine-tuning has no balancing loss unless asked). With uniform
  routing megatron's total is ``coeff * L`` and HF's ``coeff * k``. The same coefficient therefore does
  not mean the same pressure; ``tests/models`` checks both formulas against the two implementations.
* megatron's z-loss (``model.moe_z_loss_coeff``) has no HF counterpart and is dropped on export.
* HF Qwen2-MoE can mix dense and MoE layers (``decoder_sparse_step``, ``mlp_only_layers``); our model
  config cannot express that, so such checkpoints are refused with a ``ConversionError`` rather than
  converted into a different model. Renormalised top-k weights (``norm_topk_prob``) map to
  ``model.moe_norm_topk``.

Rotary embeddings: megatron's ``RotaryEmbedding`` computes ``1 / base ** (arange(0, d, 2, fp32) / d)``
in fp32, bit-identical to HF's default RoPE (checked in the tests); both rotate halves (not
interleaved pairs). megatron builds the angles for positions ``0..S-1`` and ignores ``position_ids``
(only packed sequences change that, and ``SDPAttention`` refuses those), so per-document position
resets (``reset_position_ids``) are HF-only behaviour: parity holds for positions ``0..S-1``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from common.errors import QwenPretrainError
from pretrain.models import rope_scaling
from pretrain.models.qwen2.config import ModelConfig

__all__ = [
    "ConversionError",
    "Layout",
    "HFCheckpoint",
    "model_config_from_hf",
    "hf_config_from_model",
    "hf_state_dict_from_module",
    "megatron_keys",
    "to_megatron",
    "to_hf",
    "load_hf_into_chunks",
    "local_state_dict",
    "save_hf_checkpoint",
    "global_from_checkpoint_tensors",
    "unwrap_chunk",
]


class ConversionError(QwenPretrainError, ValueError):
    """A checkpoint or config cannot be converted faithfully (unsupported feature, shape or layout)."""


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def _rope(hf_config) -> tuple[float, rope_scaling.RopeScalingConfig]:
    """RoPE base and scaling of a transformers 4.x (``rope_theta``/``rope_scaling``) or 5.x (``rope_parameters``)
    config."""
    params = getattr(hf_config, "rope_parameters", None)
    scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(params, dict) and "rope_theta" in params:
        kind, theta = params.get("rope_type", "default"), params["rope_theta"]
    else:
        params = scaling or {}
        kind = params.get("rope_type", params.get("type", "default"))
        theta = hf_config.rope_theta
    try:
        return float(theta), rope_scaling.from_hf(kind, params, hf_config.max_position_embeddings)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


def _rope_theta(hf_config) -> float:
    """RoPE base of a config without RoPE scaling (a scaled one: use :func:`_rope`)."""
    theta, scaling = _rope(hf_config)
    if scaling.type != "none":
        raise ConversionError(f"RoPE scaling {scaling.type!r} is not supported for this family")
    return theta


def model_config_from_hf(hf_config, *, name: str | None = None) -> ModelConfig:
    """Our ``ModelConfig`` for a transformers ``Qwen2Config`` / ``Qwen2MoeConfig`` (or a config.json dict)."""
    if isinstance(hf_config, Mapping):
        from transformers import AutoConfig

        hf_config = AutoConfig.for_model(**dict(hf_config))
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("qwen2", "qwen2_moe"):  # another family's checkpoint: its own mapping
        from pretrain.models import registry

        return registry.family_of_hf(model_type).config_from_hf(hf_config, name=name)
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf_config.hidden_act!r} is not supported (Qwen2 uses silu)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ConversionError("use_sliding_window=true is not supported (full causal attention only)")
    head_dim = getattr(hf_config, "head_dim", None)
    kv_channels = None if head_dim in (None, hf_config.hidden_size // hf_config.num_attention_heads) else head_dim
    if getattr(hf_config, "attention_dropout", 0.0):
        raise ConversionError("attention_dropout > 0 is not supported (megatron model trains without dropout)")
    moe = {}
    if model_type == "qwen2_moe":
        if not getattr(hf_config, "qkv_bias", True):
            raise ConversionError("qkv_bias=false is not supported (Qwen2 attention has q/k/v biases)")
        if hf_config.decoder_sparse_step != 1 or list(hf_config.mlp_only_layers or []):
            raise ConversionError(
                "dense layers inside a Qwen2-MoE model (decoder_sparse_step != 1 or mlp_only_layers) are not "
                "supported: every layer of our MoE model is a MoE layer")
        if not hf_config.shared_expert_intermediate_size:
            raise ConversionError("Qwen2-MoE without a shared expert is not supported by HF's Qwen2MoeSparseMoeBlock")
        moe = dict(
            num_experts=hf_config.num_experts,
            moe_topk=hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            shared_expert_ffn_hidden_size=hf_config.shared_expert_intermediate_size,
            moe_norm_topk=bool(hf_config.norm_topk_prob),
            moe_aux_loss_coeff=float(hf_config.router_aux_loss_coef),
        )
    if name is None:
        source = getattr(hf_config, "_name_or_path", "") or ""
        name = Path(source).name if source else f"{model_type}_hf"
    return ModelConfig(
        name=name,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        kv_channels=kv_channels,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_base=_rope(hf_config)[0],
        rope_scaling=_rope(hf_config)[1],
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
        **moe,
    )


def hf_config_from_model(model: ModelConfig, *, vocab_size: int | None = None, dtype: torch.dtype = torch.float32):
    """The transformers config (``Qwen2Config`` or ``Qwen2MoeConfig``) of ``model``.

    ``vocab_size`` overrides ``model.vocab_size`` (required when the latter is None, i.e. tokenizer-derived).
    """
    from transformers import Qwen2Config, Qwen2MoeConfig

    if model.family != "qwen2":
        from pretrain.models import registry

        return registry.get(model.family).config_to_hf(model, vocab_size=vocab_size, dtype=dtype)
    if model.qk_norm:
        raise ConversionError("model.qk_norm=true cannot be written as Qwen2 (no q/k norms): use model.family=qwen3")
    if not model.qkv_bias:
        raise ConversionError("model.qkv_bias=false cannot be written as Qwen2 (its q/k/v projections have biases)")
    vocab = vocab_size if vocab_size is not None else model.vocab_size
    if vocab is None:
        raise ConversionError("model.vocab_size is null: pass vocab_size (the embedding's row count)")
    common = dict(
        vocab_size=vocab,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        max_position_embeddings=rope_scaling.hf_max_position_embeddings(model.rope_scaling, model.max_seq_len),
        rope_theta=float(model.rope_base),
        rope_scaling=rope_scaling.to_hf(model.rope_scaling),
        rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings,
        initializer_range=model.init_std,
        hidden_act="silu",
        attention_dropout=0.0,
        use_sliding_window=False,
        head_dim=model.head_dim,
    )
    if not model.is_moe:
        config = Qwen2Config(**common)
        config.architectures = ["Qwen2ForCausalLM"]
    else:
        if model.shared_expert_ffn_hidden_size is None:
            raise ConversionError(
                "model.shared_expert_ffn_hidden_size is null: HF Qwen2-MoE always has a gated shared expert")
        config = Qwen2MoeConfig(
            **common,
            num_experts=model.num_experts,
            num_experts_per_tok=model.moe_topk,
            moe_intermediate_size=model.moe_ffn_hidden_size,
            shared_expert_intermediate_size=model.shared_expert_ffn_hidden_size,
            norm_topk_prob=model.moe_norm_topk,
            router_aux_loss_coef=model.moe_aux_loss_coeff,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
        )
        config.architectures = ["Qwen2MoeForCausalLM"]
    config.dtype = dtype  # written to config.json as the weights' dtype
    return config


# --------------------------------------------------------------------------------------------------
# Hugging Face weights on disk
# --------------------------------------------------------------------------------------------------
_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _unfuse_experts(key: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers 5 keeps experts as 3-D tensors in memory; checkpoints use one key per expert."""
    prefix, kind = _FUSED_EXPERTS.match(key).groups()
    out = {}
    for e in range(fused.shape[0]):
        if kind == "gate_up_proj":  # [E, 2I, h], gate first (``.chunk(2, dim=-1)`` of its output)
            gate, up = fused[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"] = gate
            out[f"{prefix}.{e}.up_proj.weight"] = up
        else:  # [E, h, I]
            out[f"{prefix}.{e}.down_proj.weight"] = fused[e]
    return out


def hf_state_dict_from_module(hf_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers model's weights in checkpoint naming (one key per expert; no tied ``lm_head``)."""
    state = {}
    for key, value in hf_model.state_dict().items():
        if _FUSED_EXPERTS.match(key):
            state.update(_unfuse_experts(key, value))
        else:
            state[key] = value
    if getattr(hf_model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


class HFCheckpoint(Mapping):
    """A Hugging Face checkpoint directory read lazily: ``ckpt[name]`` loads one tensor from safetensors.

    Keys use checkpoint naming (``model.layers.0.mlp.experts.3.up_proj.weight``); files that store
    experts fused (transformers 5 in-memory layout) are exposed per expert too.
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.exists():
            raise ConversionError(f"{self.path} does not exist")
        if not (self.path / "config.json").is_file():
            raise ConversionError(f"{self.path} is not a Hugging Face checkpoint (no config.json)")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.path} has no *.safetensors weights (.bin checkpoints are not supported)")
        self._handles = {}
        for f in files:  # opening reads the header and checks it against the file's size
            try:
                self._handles[f.name] = safe_open(str(f), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (not importable)
                raise ConversionError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        self._where: dict[str, tuple[str, str]] = {}  # key -> (file, stored key)
        self._fused: dict[str, str] = {}  # per-expert key -> fused stored key
        for fname, handle in self._handles.items():
            for key in handle.keys():
                if _FUSED_EXPERTS.match(key):
                    shape = handle.get_slice(key).get_shape()
                    for sub in _unfuse_experts(key, torch.empty(shape, device="meta")):
                        self._fused[sub] = key
                self._where[key] = (fname, key)

    def shape(self, key: str) -> tuple[int, ...]:
        """A stored tensor's shape, from the file header (reads no data)."""
        fname, stored = self._where[key]
        return tuple(self._handles[fname].get_slice(stored).get_shape())

    @property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.path))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._fused:
            fused = self[self._fused[key]]
            return _unfuse_experts(self._fused[key], fused)[key]
        if key not in self._where:
            raise KeyError(key)
        fname, stored = self._where[key]
        return self._handles[fname].get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self._where if not _FUSED_EXPERTS.match(k))
        yield from self._fused

    def __len__(self) -> int:
        return sum(1 for _ in self)


def save_hf_checkpoint(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor], hf_config,
                       *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``config.json`` + safetensors (sharded with an index past ``max_shard_bytes``) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(out))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Which shard of the model one rank's model chunk holds."""

    tp: int = 1
    tp_rank: int = 0
    pp: int = 1
    pp_rank: int = 0
    vpp: int = 1
    vp_stage: int = 0
    ep: int = 1
    ep_rank: int = 0
    etp: int | None = None
    """Expert tensor-parallel degree; None = tp (then ``etp_rank`` is ignored and ``tp_rank`` used)."""
    etp_rank: int = 0

    def __post_init__(self) -> None:
        for size, rank, name in ((self.tp, self.tp_rank, "tp"), (self.pp, self.pp_rank, "pp"),
                                 (self.vpp, self.vp_stage, "vpp"), (self.ep, self.ep_rank, "ep"),
                                 (self.expert_tp, self.expert_tp_rank, "etp")):
            if size < 1 or not 0 <= rank < size:
                raise ConversionError(f"layout {name}={size} with rank {rank} is invalid")

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_tp_rank(self) -> int:
        return self.tp_rank if self.etp is None else self.etp_rank

    @property
    def pre_process(self) -> bool:
        return self.pp_rank == 0 and self.vp_stage == 0

    @property
    def post_process(self) -> bool:
        return self.pp_rank == self.pp - 1 and self.vp_stage == self.vpp - 1

    def layers(self, model: ModelConfig) -> range:
        """Global indices of the layers this chunk holds (local index j is global ``layers[j]``)."""
        chunks = self.pp * self.vpp
        if model.num_layers % chunks:
            raise ConversionError(
                f"{model.num_layers} layers do not split evenly over pp × vpp = {self.pp} × {self.vpp} chunks")
        n = model.num_layers // chunks
        start = (self.vp_stage * self.pp + self.pp_rank) * n
        return range(start, start + n)

    def experts(self, model: ModelConfig) -> range:
        """Global indices of the routed experts this rank holds (``local_experts.j`` is ``experts[j]``)."""
        if model.num_experts % self.ep:
            raise ConversionError(f"parallel ep={self.ep} does not divide the model's {model.num_experts} experts")
        n = model.num_experts // self.ep
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    @classmethod
    def current(cls, vp_stage: int | None = None) -> "Layout":
        """This rank's layout from megatron-core's parallel state (process groups must exist)."""
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            vpp=ps.get_virtual_pipeline_model_parallel_world_size() or 1, vp_stage=vp_stage or 0,
            ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank(),
        )

    @classmethod
    def all(cls, *, tp: int = 1, pp: int = 1, vpp: int = 1, ep: int = 1, etp: int | None = None) -> list["Layout"]:
        """Every distinct shard of a layout (for offline merging and tests)."""
        etps = range(etp) if etp is not None else [0]
        return [cls(tp=tp, tp_rank=t, pp=pp, pp_rank=p, vpp=vpp, vp_stage=v, ep=ep, ep_rank=e, etp=etp, etp_rank=x)
                for p in range(pp) for v in range(vpp) for t in range(tp) for e in range(ep) for x in etps]


# --------------------------------------------------------------------------------------------------
# Step 1: HF <-> megatron global names
# --------------------------------------------------------------------------------------------------
# Per-layer megatron suffix -> (HF suffixes, how to combine them, how TP splits the megatron tensor).
_LAYER_RULES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "copy", "replicated"),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv", "column"),
    "self_attention.linear_qkv.bias": (
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv", "column"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "copy", "row"),
    # QK-norm (Qwen3): one [head_dim] weight shared by all heads, so every tp rank holds all of it
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "copy", "replicated"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "copy", "replicated"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "copy", "replicated"),
    # dense
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu", "glu"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "copy", "row"),
    # MoE
    "mlp.router.weight": (("mlp.gate.weight",), "copy", "replicated"),
    "mlp.experts.local_experts.{e}.linear_fc1.weight": (
        ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "glu", "glu"),
    "mlp.experts.local_experts.{e}.linear_fc2.weight": (("mlp.experts.{e}.down_proj.weight",), "copy", "row"),
    "mlp.shared_experts.linear_fc1.weight": (
        ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"), "glu", "glu"),
    "mlp.shared_experts.linear_fc2.weight": (("mlp.shared_expert.down_proj.weight",), "copy", "row"),
    "mlp.shared_experts.gate_weight": (("mlp.shared_expert_gate.weight",), "copy", "replicated"),
}
_DENSE_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
_EXPERT = ("mlp.experts.local_experts.{e}.linear_fc1.weight", "mlp.experts.local_experts.{e}.linear_fc2.weight")
_SHARED = ("mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight",
           "mlp.shared_experts.gate_weight")
_TOP_RULES = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", "vocab"),
    "decoder.final_layernorm.weight": ("model.norm.weight", "replicated"),
    "output_layer.weight": ("lm_head.weight", "vocab"),
}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_KEY = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def _layer_suffixes(model: ModelConfig) -> list[str]:
    """Per-layer megatron suffixes (with ``{e}`` for routed experts) of this model's layers."""
    skip = set(_DENSE_MLP + _EXPERT + _SHARED + ("mlp.router.weight",))
    if not model.qkv_bias:
        skip.add("self_attention.linear_qkv.bias")
    if not model.qk_norm:
        skip |= {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}
    suffixes = [s for s in _LAYER_RULES if s not in skip]
    if not model.is_moe:
        return suffixes + list(_DENSE_MLP)
    suffixes += ["mlp.router.weight", *_EXPERT]
    if model.shared_expert_ffn_hidden_size is not None:
        suffixes += list(_SHARED)
    return suffixes


def _rule(global_key: str) -> tuple[str, tuple[str, ...], str, str, bool]:
    """(HF prefix, HF names, combine, TP kind, is routed expert) of a megatron global key."""
    if global_key in _TOP_RULES:
        hf, kind = _TOP_RULES[global_key]
        return "", (hf,), "copy", kind, False
    m = _LAYER_KEY.match(global_key)
    if not m:
        raise ConversionError(f"no Hugging Face counterpart for megatron parameter {global_key!r}")
    layer, suffix = m.groups()
    expert = _EXPERT_KEY.match(suffix)
    pattern = f"mlp.experts.local_experts.{{e}}.{expert.group(2)}" if expert else suffix
    if pattern not in _LAYER_RULES:
        raise ConversionError(f"no Hugging Face counterpart for megatron parameter {global_key!r}")
    hf, combine, kind = _LAYER_RULES[pattern]
    if expert:
        hf = tuple(h.format(e=expert.group(1)) for h in hf)
    return f"model.layers.{layer}.", hf, combine, kind, expert is not None


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    groups, d = model.num_kv_heads, model.head_dim
    per_group = model.num_heads // groups
    rest = q.shape[1:]
    parts = (q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _split_qkv(qkv: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = model.num_kv_heads, model.head_dim
    per_group = model.num_heads // groups
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _global_from_hf(global_key: str, hf: Mapping[str, torch.Tensor], model: ModelConfig,
                    vocab_size: int) -> torch.Tensor:
    if global_key == "output_layer.weight" and model.tie_embeddings:
        global_key = "embedding.word_embeddings.weight"  # a later stage's copy of the tied embedding
    prefix, names, combine, kind, _ = _rule(global_key)
    try:
        tensors = [hf[prefix + n] for n in names]
    except KeyError as e:
        raise ConversionError(f"the Hugging Face checkpoint has no {e.args[0]!r} (needed for {global_key!r})") from None
    if combine == "qkv":
        return _fuse_qkv(*tensors, model)
    if combine == "glu":
        return torch.cat(tensors, dim=0)
    (tensor,) = tensors
    if kind == "vocab":
        rows = tensor.shape[0]
        if rows > vocab_size:
            raise ConversionError(f"{names[0]} has {rows} rows, more than the megatron vocabulary of {vocab_size}")
        if rows < vocab_size:  # padding rows: never looked up (ids < rows), logit 0 in the output layer
            tensor = torch.cat([tensor, tensor.new_zeros(vocab_size - rows, *tensor.shape[1:])])
    return tensor


def _hf_from_global(global_sd: Mapping[str, torch.Tensor], model: ModelConfig, hf_vocab_size: int | None) -> dict:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in global_sd.items():
        if key == "output_layer.weight" and model.tie_embeddings:
            continue
        prefix, names, combine, kind, _ = _rule(key)
        if combine == "qkv":
            pieces = _split_qkv(tensor, model)
        elif combine == "glu":
            pieces = tensor.chunk(2, dim=0)
        else:
            pieces = (tensor[:hf_vocab_size] if kind == "vocab" and hf_vocab_size is not None else tensor,)
        for name, piece in zip(names, pieces):
            out[prefix + name] = piece.contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# Step 2: global <-> one rank's shard
# --------------------------------------------------------------------------------------------------
def megatron_keys(model: ModelConfig, layout: Layout) -> list[tuple[str, str]]:
    """``(local key, global key)`` of every tensor in the ``GPTModel.state_dict()`` of one chunk
    (``_extra_state`` entries excluded)."""
    keys = []
    if layout.pre_process:
        keys.append(("embedding.word_embeddings.weight",) * 2)
    experts = layout.experts(model) if model.is_moe else range(0)
    for j, i in enumerate(layout.layers(model)):
        for suffix in _layer_suffixes(model):
            if "{e}" in suffix:
                keys += [(f"decoder.layers.{j}.{suffix.format(e=le)}", f"decoder.layers.{i}.{suffix.format(e=ge)}")
                         for le, ge in enumerate(experts)]
            else:
                keys.append((f"decoder.layers.{j}.{suffix}", f"decoder.layers.{i}.{suffix}"))
    if layout.post_process:
        keys.append(("decoder.final_layernorm.weight",) * 2)
        if not (model.tie_embeddings and layout.pre_process):
            keys.append(("output_layer.weight",) * 2)
    return keys


def _tp_of(layout: Layout, is_expert: bool) -> tuple[int, int]:
    return (layout.expert_tp, layout.expert_tp_rank) if is_expert else (layout.tp, layout.tp_rank)


def _shard(tensor: torch.Tensor, kind: str, size: int, rank: int, what: str) -> torch.Tensor:
    if kind == "replicated" or size == 1:
        return tensor
    dim = 1 if kind == "row" else 0
    halves = tensor.chunk(2, dim=0) if kind == "glu" else (tensor,)
    if any(h.shape[dim] % size for h in halves):
        raise ConversionError(
            f"{what}: dimension {dim} of shape {tuple(tensor.shape)} does not split over {size} ranks")
    return torch.cat([h.chunk(size, dim=dim)[rank] for h in halves], dim=0)


def _unshard(pieces: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "replicated" or len(pieces) == 1:
        return pieces[0]
    if kind == "glu":
        gates, ups = zip(*(p.chunk(2, dim=0) for p in pieces))
        return torch.cat([*gates, *ups], dim=0)
    return torch.cat(pieces, dim=1 if kind == "row" else 0)


def _check_layout(model: ModelConfig, layout: Layout) -> None:
    if model.num_kv_heads % layout.tp:
        raise ConversionError(
            f"tp={layout.tp} does not divide the model's {model.num_kv_heads} key/value heads: a rank must hold "
            "whole query groups")


def to_megatron(hf: Mapping[str, torch.Tensor], model: ModelConfig, layout: Layout = Layout(),
                *, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The local ``GPTModel`` state dict of one chunk, from HF weights in checkpoint naming.

    ``hf`` may be lazy (``HFCheckpoint``): only the tensors this shard needs are read.
    ``vocab_size``: megatron's (padded) vocabulary; default the HF embedding's rows.
    """
    _check_layout(model, layout)
    if vocab_size is None:
        vocab_size = hf["model.embed_tokens.weight"].shape[0]
    out = {}
    for local, global_key in megatron_keys(model, layout):
        _, _, _, kind, is_expert = _rule(global_key)
        size, rank = _tp_of(layout, is_expert)
        tensor = _global_from_hf(global_key, hf, model, vocab_size)
        out[local] = _shard(tensor, kind, size, rank, global_key).contiguous()
    return out


def to_hf(shards: Iterable[tuple[Layout, Mapping[str, torch.Tensor]]], model: ModelConfig,
          *, hf_vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """HF weights (checkpoint naming) from the local state dicts of every shard of one layout.

    ``shards``: ``(layout, chunk state dict)`` pairs covering every (pp, vp, tp, ep, etp) position;
    replicas (data-parallel copies, the same tensor on several ranks) are allowed and the first one is
    taken. ``hf_vocab_size`` drops megatron's vocabulary padding rows (default: keep them all).
    """
    pieces: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    kinds: dict[str, tuple[str, int]] = {}
    for layout, sd in shards:
        _check_layout(model, layout)
        for local, global_key in megatron_keys(model, layout):
            if local not in sd:
                raise ConversionError(f"shard {layout} has no {local!r}")
            _, _, _, kind, is_expert = _rule(global_key)
            size, rank = _tp_of(layout, is_expert)
            kinds[global_key] = (kind, size)
            pieces[global_key].setdefault(rank if kind != "replicated" else 0, sd[local])
    global_sd = {}
    for key, by_rank in pieces.items():
        kind, size = kinds[key]
        expected = 1 if kind == "replicated" else size
        if sorted(by_rank) != list(range(expected)):
            raise ConversionError(f"{key}: have tensor-parallel ranks {sorted(by_rank)} of {expected}")
        global_sd[key] = _unshard([by_rank[r] for r in range(expected)], kind)
    missing = {g for _, g in megatron_keys(model, Layout())} - set(global_sd)
    if missing:
        raise ConversionError(f"the shards do not cover the whole model; missing e.g. {sorted(missing)[:3]}")
    return _hf_from_global(global_sd, model, hf_vocab_size)


def global_from_checkpoint_tensors(stacked: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """megatron global state dict from a ``torch_dist`` checkpoint's (layer- and expert-stacked) tensors.

    ``dist_checkpointing`` stores ``decoder.layers.<suffix>`` as one ``[L, ...]`` tensor and routed experts
    as ``decoder.layers.mlp.experts.experts.<suffix>`` ``[L, E, ...]``; the top-level tensors as they are.
    """
    out = {}
    for key, tensor in stacked.items():
        if key.startswith("decoder.layers.mlp.experts.experts."):
            suffix = key[len("decoder.layers.mlp.experts.experts."):]
            for i in range(tensor.shape[0]):
                for e in range(tensor.shape[1]):
                    out[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.{suffix}"] = tensor[i, e]
        elif key.startswith("decoder.layers."):
            suffix = key[len("decoder.layers."):]
            for i in range(tensor.shape[0]):
                out[f"decoder.layers.{i}.{suffix}"] = tensor[i]
        else:
            out[key] = tensor
    if model.tie_embeddings:
        out.pop("output_layer.weight", None)
    return out


# --------------------------------------------------------------------------------------------------
# Live models
# --------------------------------------------------------------------------------------------------
def unwrap_chunk(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def local_state_dict(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A chunk's tensors under GPTModel names (wrappers removed, ``_extra_state`` dropped)."""
    return {k: v for k, v in unwrap_chunk(chunk).state_dict().items() if torch.is_tensor(v)}


def load_hf_into_chunks(chunks: list[torch.nn.Module], hf: Mapping[str, torch.Tensor], model: ModelConfig) -> None:
    """Copy HF weights into this rank's model chunks (built by ``build_model_chunks``, maybe wrapped).

    Checks that the expected key set equals the chunk's, so a layout the mapping gets wrong fails
    loudly instead of leaving random weights behind.
    """
    for i, chunk in enumerate(chunks):
        gpt = unwrap_chunk(chunk)
        layout = Layout.current(vp_stage=i if len(chunks) > 1 else None)
        actual = {k: v for k, v in gpt.state_dict(keep_vars=True).items() if torch.is_tensor(v)}
        wanted = to_megatron(hf, model, layout, vocab_size=gpt.vocab_size)
        if set(actual) != set(wanted):
            raise ConversionError(
                f"layout {layout}: megatron chunk keys and mapped keys differ: only in chunk "
                f"{sorted(set(actual) - set(wanted))[:5]}, only in mapping {sorted(set(wanted) - set(actual))[:5]}")
        with torch.no_grad():
            for key, value in wanted.items():
                if actual[key].shape != value.shape:
                    raise ConversionError(
                        f"{key}: mapped shape {tuple(value.shape)} != chunk shape "
                        f"{tuple(actual[key].shape)} ({layout})")
                actual[key].copy_(value)
