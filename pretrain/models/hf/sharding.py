"""megatron-core weights between one global (TP=PP=EP=1) state dict and each rank's shard, for any
TP/PP/VPP/EP/ETP layout, and HF weights in and out of live model chunks through a family's state-dict adapter.

Two steps, each pure tensor bookkeeping:

1. **HF <-> megatron "global" names** is the family's (``ModelFamily.adapter()``: ``global_from_hf`` and
   ``hf_from_global``, e.g. ``pretrain/models/qwen2/state_dict.py``), on unpadded vocabularies.
2. **global <-> one rank's shard** (``Layout``) is here: megatron numbers layers locally from 0 on each
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

**Vocabulary padding** is also here: megatron's vocabulary ``V_m`` (``padded_vocab_size``) may be larger than
HF's ``V_hf``. Import appends ``V_m - V_hf`` zero rows to the embedding and the output layer; export drops
every row past ``hf_vocab_size``. Logits over the real vocabulary are then identical, but the padded rows add
``V_m - V_hf`` logits of exactly 0 to megatron's softmax, so megatron's loss is not HF's loss until training
pushes those logits down (they are never targets). Parity is exact when ``V_m == V_hf``, which holds for every
preset (``padded_vocab_size`` returns a preset's fixed size unpadded).
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

from parallel.layout import ParallelLayout, expert_tensor_parallel
from pretrain.models.config import ModelConfig
from pretrain.models.hf.checkpoint import ConversionError


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
    """Expert tensor-parallel degree; None = the default (``parallel.layout.expert_tensor_parallel``: tp), then
    ``etp_rank`` is ignored and ``tp_rank`` used (the expert and dense tensor-parallel groups coincide)."""
    etp_rank: int = 0

    def __post_init__(self) -> None:
        for size, rank, name in ((self.tp, self.tp_rank, "tp"), (self.pp, self.pp_rank, "pp"),
                                 (self.vpp, self.vp_stage, "vpp"), (self.ep, self.ep_rank, "ep"),
                                 (self.expert_tp, self.expert_tp_rank, "etp")):
            if size < 1 or not 0 <= rank < size:
                raise ConversionError(f"layout {name}={size} with rank {rank} is invalid")

    @property
    def expert_tp(self) -> int:
        return expert_tensor_parallel(self.tp, self.etp)

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
    def of(cls, layout: ParallelLayout, *, tp_rank: int = 0, pp_rank: int = 0, vp_stage: int = 0, ep_rank: int = 0,
           etp_rank: int = 0) -> "Layout":
        """The shard a rank at these coordinates holds under a job's resolved layout."""
        return cls(tp=layout.tp, tp_rank=tp_rank, pp=layout.pp, pp_rank=pp_rank, vpp=layout.vpp, vp_stage=vp_stage,
                   ep=layout.ep, ep_rank=ep_rank, etp=layout.etp, etp_rank=etp_rank)

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
# megatron's parameter names and how tensor parallelism splits each
# --------------------------------------------------------------------------------------------------
# Per-layer megatron suffix -> how TP splits it ({e}: a routed expert's number).
LAYER_TP: dict[str, str] = {
    "input_layernorm.weight": "replicated",
    "self_attention.linear_qkv.weight": "column",
    "self_attention.linear_qkv.bias": "column",
    "self_attention.linear_proj.weight": "row",
    # QK-norm: one [head_dim] weight shared by all heads, so every tp rank holds all of it
    "self_attention.q_layernorm.weight": "replicated",
    "self_attention.k_layernorm.weight": "replicated",
    "pre_mlp_layernorm.weight": "replicated",
    "mlp.linear_fc1.weight": "glu",
    "mlp.linear_fc2.weight": "row",
    "mlp.router.weight": "replicated",
    "mlp.experts.local_experts.{e}.linear_fc1.weight": "glu",
    "mlp.experts.local_experts.{e}.linear_fc2.weight": "row",
    "mlp.shared_experts.linear_fc1.weight": "glu",
    "mlp.shared_experts.linear_fc2.weight": "row",
    "mlp.shared_experts.gate_weight": "replicated",
}
TOP_TP = {"embedding.word_embeddings.weight": "vocab", "decoder.final_layernorm.weight": "replicated",
          "output_layer.weight": "vocab"}
_DENSE_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
_EXPERT = ("mlp.experts.local_experts.{e}.linear_fc1.weight", "mlp.experts.local_experts.{e}.linear_fc2.weight")
_SHARED = ("mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight",
           "mlp.shared_experts.gate_weight")
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_KEY = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class GlobalKey:
    """A megatron global parameter name, parsed: ``layer``/``expert`` None for top-level / non-expert tensors;
    ``pattern`` is the key of :data:`LAYER_TP` (or the name itself at top level)."""

    name: str
    pattern: str
    layer: int | None = None
    expert: int | None = None

    @property
    def tp_kind(self) -> str:
        return TOP_TP[self.pattern] if self.layer is None else LAYER_TP[self.pattern]


def parse_key(global_key: str) -> GlobalKey:
    if global_key in TOP_TP:
        return GlobalKey(global_key, global_key)
    m = _LAYER_KEY.match(global_key)
    if m:
        layer, suffix = m.groups()
        expert = _EXPERT_KEY.match(suffix)
        pattern = f"mlp.experts.local_experts.{{e}}.{expert.group(2)}" if expert else suffix
        if pattern in LAYER_TP:
            return GlobalKey(global_key, pattern, int(layer), int(expert.group(1)) if expert else None)
    raise ConversionError(f"no Hugging Face counterpart for megatron parameter {global_key!r}")


def _layer_suffixes(model: ModelConfig) -> list[str]:
    """Per-layer megatron suffixes (with ``{e}`` for routed experts) of this model's layers."""
    skip = set(_DENSE_MLP + _EXPERT + _SHARED + ("mlp.router.weight",))
    if not model.qkv_bias:
        skip.add("self_attention.linear_qkv.bias")
    if not model.qk_norm:
        skip |= {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}
    suffixes = [s for s in LAYER_TP if s not in skip]
    if not model.is_moe:
        return suffixes + list(_DENSE_MLP)
    suffixes += ["mlp.router.weight", *_EXPERT]
    if model.shared_expert_ffn_hidden_size is not None:
        suffixes += list(_SHARED)
    return suffixes


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


# --------------------------------------------------------------------------------------------------
# global <-> one rank's shard
# --------------------------------------------------------------------------------------------------
def _adapter(model: ModelConfig):
    from pretrain.models import registry

    return registry.get(model.family).adapter()


def _tp_of(layout: Layout, key: GlobalKey) -> tuple[int, int]:
    return (layout.expert_tp, layout.expert_tp_rank) if key.expert is not None else (layout.tp, layout.tp_rank)


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


def _pad_vocab(tensor: torch.Tensor, vocab_size: int, what: str) -> torch.Tensor:
    rows = tensor.shape[0]
    if rows > vocab_size:
        raise ConversionError(f"{what} has {rows} rows, more than the megatron vocabulary of {vocab_size}")
    if rows < vocab_size:  # padding rows: never looked up (ids < rows), logit 0 in the output layer
        tensor = torch.cat([tensor, tensor.new_zeros(vocab_size - rows, *tensor.shape[1:])])
    return tensor


def to_megatron(hf: Mapping[str, torch.Tensor], model: ModelConfig, layout: Layout = Layout(),
                *, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The local ``GPTModel`` state dict of one chunk, from HF weights in checkpoint naming.

    ``hf`` may be lazy (``HFCheckpoint``): only the tensors this shard needs are read.
    ``vocab_size``: megatron's (padded) vocabulary; default the HF embedding's rows.
    """
    _check_layout(model, layout)
    adapter = _adapter(model)
    if vocab_size is None:
        vocab_size = adapter.hf_vocab_rows(hf)
    out = {}
    for local, global_key in megatron_keys(model, layout):
        key = parse_key(global_key)
        source = global_key
        if global_key == "output_layer.weight" and model.tie_embeddings:
            source = "embedding.word_embeddings.weight"  # a later stage's copy of the tied embedding
        tensor = adapter.global_from_hf(source, hf, model)
        if key.tp_kind == "vocab":
            tensor = _pad_vocab(tensor, vocab_size, f"the Hugging Face tensor for {source!r}")
        size, rank = _tp_of(layout, key)
        out[local] = _shard(tensor, key.tp_kind, size, rank, global_key).contiguous()
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
            key = parse_key(global_key)
            size, rank = _tp_of(layout, key)
            kinds[global_key] = (key.tp_kind, size)
            pieces[global_key].setdefault(rank if key.tp_kind != "replicated" else 0, sd[local])
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
    return hf_from_global(global_sd, model, hf_vocab_size=hf_vocab_size)


def hf_from_global(global_sd: Mapping[str, torch.Tensor], model: ModelConfig, *,
                   hf_vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """HF weights from a megatron global state dict (the tied output layer dropped, vocabulary padding cut)."""
    trimmed = {}
    for key, tensor in global_sd.items():
        if key == "output_layer.weight" and model.tie_embeddings:
            continue
        if hf_vocab_size is not None and parse_key(key).tp_kind == "vocab":
            tensor = tensor[:hf_vocab_size]
        trimmed[key] = tensor
    return {k: v.contiguous() for k, v in _adapter(model).hf_from_global(trimmed, model).items()}


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
