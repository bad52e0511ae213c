"""``plan.*``: what the layout planner searches (defaults in conf/plan/default.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from common.errors import ConfigError, check_choice
from pretrain.config import JobConfig


@dataclass(kw_only=True, slots=True)
class PlanConfig:
    gpus: int = 8
    """GPUs of the job (world size)."""
    gpu: str = "h100_80gb"
    """GPU type: h100_80gb, h200_141gb, a100_80gb, b200 (pretrain/plan/hardware.py)."""
    format: str = "table"
    """'table' (ranked, human) or 'json' (one object per layout, memory in GiB, time in s)."""
    top: int = 10
    """Layouts shown (feasible first, fastest first); infeasible ones follow with their reason."""
    show_infeasible: int = 5
    """How many infeasible layouts to list after the feasible ones."""
    micro_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    recompute: list[str] = field(default_factory=lambda: ["none", "selective", "full"])
    zero: list[int] = field(default_factory=lambda: [0, 1, 3])
    max_vpp: int = 4
    reserved_gib: float = 4.0
    """Memory held back per GPU for the CUDA context, NCCL buffers and allocator fragmentation (an assumption,
    not derived: Megatron Bridge's estimator documents the same omissions)."""
    vocab_size: int | None = None
    """Vocabulary when the model preset has none (tokenizer-sized models); None = model.vocab_size."""

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"plan.gpus must be >= 1, got {self.gpus}")
        check_choice("plan.format", self.format, ("table", "json"))
        for r in self.recompute:
            check_choice("plan.recompute", r, ("none", "selective", "full"))
        for z in self.zero:
            check_choice("plan.zero", z, (0, 1, 2, 3))
        if not self.micro_batch_sizes or min(self.micro_batch_sizes) < 1:
            raise ConfigError(f"plan.micro_batch_sizes must be positive integers, got {list(self.micro_batch_sizes)}")
        if self.top < 1:
            raise ConfigError(f"plan.top must be >= 1, got {self.top}")


@dataclass(kw_only=True, slots=True)
class PlanJobConfig(JobConfig):
    plan: PlanConfig = field(default_factory=PlanConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="plan_job_schema", node=PlanJobConfig)
