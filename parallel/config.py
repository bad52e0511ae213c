"""The parallel section a user types: degrees, ZeRO stage, and the checks of each field on its own.

Degrees that depend on the world size (dp) or default to another (etp) are resolved, and the layout checked
against the world size and the model, once, by ``parallel.layout.ParallelLayout``."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError, check_choice


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree: attention heads and MLP columns are split over this many ranks."""
    sequence_parallel: bool = False
    """Shard activations outside attention/MLP along the sequence over the tensor-parallel group (needs tp > 1)."""
    pp: int = 1
    """Pipeline-parallel degree: the layers are split into this many stages."""
    cp: int = 1
    """Context-parallel degree: each sequence is split into 2 × cp chunks, rank r of the group holding chunks
    r and 2cp-1-r (balanced causal work); attention all-gathers keys/values over the group (long sequences)."""
    vpp: int = 1
    """Virtual pipeline stages per rank (> 1 selects the interleaved 1F1B schedule)."""
    ep: int = 1
    """Expert-parallel degree for MoE models (experts are split over this many ranks of the data-parallel group)."""
    etp: int | None = None
    """Expert tensor-parallel degree; None means the same as tp."""
    dp: int = -1
    """Data-parallel degree; -1 means whatever is left of the world size after tp × pp × cp."""
    zero: int = 1
    """ZeRO stage: 0 = plain DDP, 1 = megatron-core distributed optimizer, 2/3 = DeepSpeed."""
    moe_dispatcher: str = "alltoall"
    """How MoE tokens reach the expert-parallel rank that holds their expert."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (GPU runs)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the fp32 master weights and Adam moments in CPU memory and step there (zero 2/3 only)."""
    timeout_s: int = 600
    """Seconds a collective (and the process-group setup) waits for the other ranks before the rank fails:
    the bound on a hang when a node stops answering. Longer than the slowest legitimate wait (a checkpoint
    save, a first-step compile); Slurm's node timeout usually ends a job on a lost node sooner."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "vpp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name} must be an integer >= 1, got {value!r}")
        if self.etp is not None and self.etp < 1:
            raise ConfigError(f"parallel.etp must be >= 1 or null, got {self.etp}")
        if self.dp == 0 or self.dp < -1:
            raise ConfigError(f"parallel.dp must be >= 1, or -1 to fill the world size, got {self.dp}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1 (it shards over the tensor-parallel group)")
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"parallel.vpp={self.vpp} needs parallel.pp > 1 (virtual stages interleave a pipeline)")
        if not isinstance(self.timeout_s, int) or self.timeout_s < 1:
            raise ConfigError(f"parallel.timeout_s must be an integer >= 1 (seconds), got {self.timeout_s!r}")
        check_choice("parallel.zero", self.zero, (0, 1, 2, 3))
        check_choice("parallel.moe_dispatcher", self.moe_dispatcher, ("alltoall", "allgather"))
        if self.zero in (2, 3) and (self.tp > 1 or self.pp > 1 or self.ep > 1 or self.cp > 1):
            # DeepSpeed would average gradients over every rank as data-parallel replicas; cp ranks hold
            # parts of the same sequences and their gradients must be summed over megatron's dp × cp group.
            raise ConfigError(
                f"parallel.zero={self.zero} runs through DeepSpeed, which serves data-parallel layouts only; "
                f"got tp={self.tp}, pp={self.pp}, ep={self.ep}, cp={self.cp}. Use parallel.zero=1 (megatron-core's "
                "distributed optimizer) with tensor/pipeline/expert/context parallelism."
            )
        if self.offload_optimizer and self.zero not in (2, 3):
            raise ConfigError(
                f"parallel.offload_optimizer=true needs parallel.zero=2 or 3 (DeepSpeed ZeRO-Offload); got "
                f"parallel.zero={self.zero}"
            )
