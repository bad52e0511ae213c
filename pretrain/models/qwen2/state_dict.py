"""The Qwen2 family's state-dict adapter (STYLE.md point 3): Hugging Face weight names <-> megatron-core
"global" names, the keys of a TP=1/PP=1/EP=1 ``GPTModel.state_dict()`` with global layer and expert numbers.
Qwen3 uses the same names (plus ``self_attn.{q,k}_norm``). Sharding over any layout and vocabulary padding are
family-agnostic: ``pretrain/models/hf/sharding.py``.


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

Semantic differences between megatron-core's MoE (as ``decoder.model.transformer_config`` sets it up) and HF
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

from collections.abc import Mapping

import torch

from pretrain.models.config import ModelConfig
from pretrain.models.hf.checkpoint import ConversionError
from pretrain.models.hf.sharding import parse_key

_EMBEDDING = "model.embed_tokens.weight"
# megatron per-layer suffix -> (HF suffixes under ``model.layers.{i}.``, how they combine into the megatron tensor)
_LAYER_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "copy"),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "copy"),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "copy"),  # Qwen3's QK-norm
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "copy"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "copy"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "copy"),
    "mlp.router.weight": (("mlp.gate.weight",), "copy"),
    "mlp.experts.local_experts.{e}.linear_fc1.weight": (
        ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "glu"),
    "mlp.experts.local_experts.{e}.linear_fc2.weight": (("mlp.experts.{e}.down_proj.weight",), "copy"),
    "mlp.shared_experts.linear_fc1.weight": (
        ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"), "glu"),
    "mlp.shared_experts.linear_fc2.weight": (("mlp.shared_expert.down_proj.weight",), "copy"),
    "mlp.shared_experts.gate_weight": (("mlp.shared_expert_gate.weight",), "copy"),
}
_TOP_NAMES = {"embedding.word_embeddings.weight": _EMBEDDING, "decoder.final_layernorm.weight": "model.norm.weight",
              "output_layer.weight": "lm_head.weight"}


def _names(global_key: str) -> tuple[tuple[str, ...], str]:
    """The HF names (checkpoint naming) of a megatron global key and how they combine."""
    key = parse_key(global_key)
    if key.layer is None:
        return (_TOP_NAMES[global_key],), "copy"
    names, combine = _LAYER_NAMES[key.pattern]
    prefix = f"model.layers.{key.layer}."
    return tuple(prefix + n.format(e=key.expert) for n in names), combine


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


def hf_vocab_rows(hf: Mapping[str, torch.Tensor]) -> int:
    """Rows of the HF input embedding (read from the file header where ``hf`` is an ``HFCheckpoint``)."""
    return hf.shape(_EMBEDDING)[0] if hasattr(hf, "shape") else hf[_EMBEDDING].shape[0]


def global_from_hf(global_key: str, hf: Mapping[str, torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """The megatron global tensor ``global_key`` from HF weights (HF's vocabulary rows, unpadded)."""
    names, combine = _names(global_key)
    try:
        tensors = [hf[n] for n in names]
    except KeyError as e:
        raise ConversionError(f"the Hugging Face checkpoint has no {e.args[0]!r} (needed for {global_key!r})") from None
    if combine == "qkv":
        return _fuse_qkv(*tensors, model)
    if combine == "glu":
        return torch.cat(tensors, dim=0)
    return tensors[0]


def hf_from_global(global_sd: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """HF weights (checkpoint naming) from megatron global tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in global_sd.items():
        names, combine = _names(key)
        if combine == "qkv":
            pieces = _split_qkv(tensor, model)
        elif combine == "glu":
            pieces = tensor.chunk(2, dim=0)
        else:
            pieces = (tensor,)
        out.update(zip(names, pieces))
    return out
