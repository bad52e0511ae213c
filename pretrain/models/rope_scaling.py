"""RoPE scaling for evaluation beyond the trained length: YaRN and dynamic NTK-aware, as transformers computes them
(the config, the inverse frequencies, the HF config.json entry, the checkpoint's record; the megatron-core module
that uses them is pretrain/models/rope_embedding.py, kept apart so configs import without megatron).

megatron-core 0.16.1 has a ``YarnRotaryEmbedding`` with the same inverse frequencies as transformers, but GPTModel
only builds it under ``position_embedding_type='yarn'``, which reads MLA config fields and moves its tables to CUDA
unconditionally. Here the plain ``RotaryEmbedding`` gets the scaled inverse frequencies instead (kept in fp32, as
Qwen does: they are a plain attribute, not a buffer, so bf16 casts leave them alone), and YaRN's attention factor
goes through megatron's own hook: ``SelfAttention`` multiplies cos/sin by
``_yarn_get_concentration_factor_from_config(config)`` (= 0.1 ln(factor) + 1, transformers' default
``attention_factor``) once the config carries ``yarn_rotary_scaling_factor``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.errors import ConfigError, check_choice

KINDS = ("none", "yarn", "dynamic")


@dataclass(kw_only=True, slots=True)
class RopeScalingConfig:
    type: str = "none"
    """'none' (plain RoPE), 'yarn' (transformers ``rope_type: yarn``) or 'dynamic' (NTK-aware, transformers
    ``rope_type: dynamic``: the base grows with the sequence length once it passes the original length)."""
    factor: float = 1.0
    """Context extension factor (HF ``factor``), >= 1."""
    original_max_position_embeddings: int | None = None
    """The length the model was trained at (HF ``original_max_position_embeddings``); required unless type=none."""
    beta_fast: float = 32.0
    """YaRN: rotations above which a dimension is extrapolated (kept as trained)."""
    beta_slow: float = 1.0
    """YaRN: rotations below which a dimension is interpolated (divided by ``factor``)."""

    def __post_init__(self) -> None:
        check_choice("model.rope_scaling.type", self.type, KINDS)
        if self.type == "none":
            return
        if not self.factor >= 1.0:
            raise ConfigError(f"model.rope_scaling.factor must be >= 1, got {self.factor}")
        orig = self.original_max_position_embeddings
        if not isinstance(orig, int) or orig < 1:
            raise ConfigError(
                f"model.rope_scaling.original_max_position_embeddings must be a positive integer with "
                f"type={self.type}, got {orig!r}")

    def describe(self) -> dict:
        """What a checkpoint records (and compares) about the scaling."""
        if self.type == "none":
            return {"type": "none"}
        return {"type": self.type, "factor": float(self.factor),
                "original_max_position_embeddings": self.original_max_position_embeddings}


def plain_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def yarn_inv_freq(dim: int, base: float, s: RopeScalingConfig) -> torch.Tensor:
    """transformers ``_compute_yarn_parameters`` (truncate=True): dimensions that rotate more than ``beta_fast``
    times over the original length keep their frequency, those under ``beta_slow`` are divided by ``factor``,
    a linear ramp in between."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoids a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    return (1.0 / (s.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def yarn_attention_factor(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def dynamic_ntk_inv_freq(dim: int, base: float, s: RopeScalingConfig, seq_len: int) -> torch.Tensor:
    """transformers ``_compute_dynamic_ntk_parameters`` with its ``max_position_embeddings`` = our
    ``original_max_position_embeddings``: the plain table up to that length, a larger base past it."""
    orig = s.original_max_position_embeddings
    seq_len = max(seq_len, orig)
    scaled = base * ((s.factor * seq_len / orig) - (s.factor - 1)) ** (dim / (dim - 2))
    return plain_inv_freq(dim, scaled)


# --------------------------------------------------------------------------------------------------
# Hugging Face config.json
# --------------------------------------------------------------------------------------------------
def to_hf(scaling: RopeScalingConfig) -> dict | None:
    """The ``rope_scaling`` entry of an exported config.json (None: plain RoPE)."""
    if scaling.type == "none":
        return None
    entry = {"rope_type": scaling.type, "factor": float(scaling.factor)}
    if scaling.type == "yarn":  # dynamic reads its original length from max_position_embeddings
        entry.update(original_max_position_embeddings=scaling.original_max_position_embeddings,
                     beta_fast=float(scaling.beta_fast), beta_slow=float(scaling.beta_slow))
    return entry


def hf_max_position_embeddings(scaling: RopeScalingConfig, max_seq_len: int) -> int:
    """transformers' dynamic NTK takes its original length from ``max_position_embeddings``."""
    return scaling.original_max_position_embeddings if scaling.type == "dynamic" else max_seq_len


def from_hf(kind: str, params: dict, max_position_embeddings: int) -> RopeScalingConfig:
    """Ours for a transformers ``rope_parameters`` / ``rope_scaling`` dict of type ``kind``; ValueError otherwise."""
    if kind in ("default", None):
        return RopeScalingConfig()
    if kind == "yarn":
        if params.get("attention_factor") is not None or params.get("mscale") or params.get("mscale_all_dim"):
            raise ValueError("YaRN with attention_factor/mscale/mscale_all_dim is not supported")
        if params.get("truncate", True) is not True:
            raise ValueError("YaRN with truncate=false is not supported")
        orig = params.get("original_max_position_embeddings") or max_position_embeddings
        factor = params.get("factor") or max_position_embeddings / orig
        return RopeScalingConfig(type="yarn", factor=float(factor), original_max_position_embeddings=int(orig),
                                 beta_fast=float(params.get("beta_fast") or 32),
                                 beta_slow=float(params.get("beta_slow") or 1))
    if kind == "dynamic":
        return RopeScalingConfig(type="dynamic", factor=float(params["factor"]),
                                 original_max_position_embeddings=int(max_position_embeddings))
    raise ValueError(f"RoPE scaling {kind!r} is not supported (none, yarn and dynamic are)")


# --------------------------------------------------------------------------------------------------
# What a checkpoint records, and the check that a change of RoPE is declared
# --------------------------------------------------------------------------------------------------
def record(model) -> dict:
    """The RoPE a checkpoint's weights were trained with (written as its rope.json)."""
    return {"rope_base": float(model.rope_base), "rope_scaling": model.rope_scaling.describe()}


def check_change(saved: dict | None, model, what: str) -> None:
    """ConfigError when ``model``'s RoPE differs from a checkpoint's record and ``model.rope_change_ok`` does not
    declare the change (a long-context stage raising the base declares it). No record: nothing to compare."""
    if saved is None or model.rope_change_ok:
        return
    mine = record(model)
    if saved["rope_base"] != mine["rope_base"]:
        raise ConfigError(
            f"model.rope_base={mine['rope_base']:g} but {what} was trained with rope_base={saved['rope_base']:g}: "
            "set model.rope_change_ok=true to declare the change")
    if saved["rope_scaling"] != mine["rope_scaling"]:
        raise ConfigError(
            f"model.rope_scaling={mine['rope_scaling']} but {what} was trained with {saved['rope_scaling']}: "
            "set model.rope_change_ok=true to declare the change")
