"""Activation recompute as one config: ``trainer.recompute``, ``recompute_modules``, ``recompute_method`` and
``recompute_num_layers`` (the flat fields a user types) grouped, checked, and mapped onto megatron-core."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError, check_choice

MODULES = ("core_attn", "mlp", "moe", "shared_experts")


@dataclass(frozen=True, kw_only=True, slots=True)
class RecomputeConfig:
    """megatron-core activation recompute (``TrainerConfig.recompute_config`` builds it from the trainer fields)."""

    mode: str = "none"
    """``trainer.recompute``: 'none', 'selective' (``modules`` rerun in backward) or 'full' (only each unit's
    input is kept; the layers rerun in backward)."""
    modules: tuple[str, ...] = ("core_attn",)
    """``trainer.recompute_modules`` (mode selective)."""
    method: str = "uniform"
    """``trainer.recompute_method`` (mode full): 'uniform' units of ``num_layers`` layers, or 'block': the first
    ``num_layers`` layers of each pipeline stage."""
    num_layers: int = 1
    """``trainer.recompute_num_layers`` (mode full)."""

    def __post_init__(self) -> None:
        check_choice("trainer.recompute", self.mode, ("none", "selective", "full"))
        check_choice("trainer.recompute_method", self.method, ("uniform", "block"))
        if self.num_layers < 1:
            raise ConfigError(f"trainer.recompute_num_layers must be >= 1, got {self.num_layers}")
        for module in self.modules:
            if module in ("layernorm", "moe_act"):  # megatron-core implements these with TransformerEngine only
                raise ConfigError(
                    f"trainer.recompute_modules: {module!r} needs TransformerEngine"
                    f"{' and grouped GEMM' if module == 'moe_act' else ''}, which this stack does not use; "
                    "choose from 'core_attn', 'mlp', 'moe', 'shared_experts'"
                )
            if module not in MODULES:
                raise ConfigError(
                    f"trainer.recompute_modules: {module!r} is not one of 'core_attn', 'mlp', 'moe', 'shared_experts'"
                )
        if self.mode == "selective" and not self.modules:
            raise ConfigError("trainer.recompute=selective needs at least one entry in trainer.recompute_modules")

    def megatron_fields(self) -> dict:
        """megatron-core's recompute fields. Both granularities rerun layers through ``tensor_parallel.checkpoint``,
        which saves and restores the RNG tracker's states (routed to the CPU generator by the CPU seam), so dropout
        replays identically. Recompute runs in training only: evaluation (eval mode) stores nothing anyway."""
        if self.mode == "none":
            return {}
        if self.mode == "selective":
            return dict(recompute_granularity="selective", recompute_modules=list(self.modules))
        return dict(recompute_granularity="full", recompute_method=self.method, recompute_num_layers=self.num_layers)

    def describe(self) -> str:
        if self.mode == "selective":
            return f"selective ({', '.join(self.modules)})"
        if self.mode == "full":
            return f"full ({self.method}, {self.num_layers} layer{'s' if self.num_layers > 1 else ''})"
        return "none"
