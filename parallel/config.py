"""The parallel layout: degrees, ZeRO stage, and the checks that refuse a layout before any process starts."""
from __future__ import annotations

import math
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

    @property
    def model_parallel_size(self) -> int:
        """Ranks that share one data-parallel replica: tp × pp × cp (megatron-core's ``model_size``)."""
        return self.tp * self.pp * self.cp

    def _degrees(self) -> tuple[str, str]:
        """The non-data degrees as "parallel.tp × parallel.pp" and "2 × 1" (cp named only when used)."""
        names, values = ["tp", "pp"] + (["cp"] if self.cp > 1 else []), [self.tp, self.pp, self.cp]
        return " × ".join(f"parallel.{n}" for n in names), " × ".join(str(v) for v in values[: len(names)])

    @property
    def local_world_size(self) -> int:
        """Processes a bare local launch starts: tp × pp × cp × dp, with dp=-1 meaning the smallest that
        holds the expert-parallel groups (megatron-core spreads experts over tp × cp × dp ranks)."""
        dp = self.dp
        if dp == -1:
            experts = self.ep * (self.etp or self.tp)
            dp = experts // math.gcd(self.tp * self.cp, experts)
        return self.model_parallel_size * dp

    def resolve_dp(self, world_size: int) -> int:
        """The data-parallel degree for ``world_size`` processes, or a ConfigError naming the mismatch."""
        names, values = self._degrees()
        if world_size % self.model_parallel_size:
            raise ConfigError(
                f"world size {world_size} is not divisible by {names} = {values} = {self.model_parallel_size}"
            )
        dp = world_size // self.model_parallel_size
        if self.dp != -1 and self.dp != dp:
            raise ConfigError(
                f"{names} × parallel.dp = {values} × {self.dp} = "
                f"{self.model_parallel_size * self.dp} processes, but the world size is {world_size}; "
                f"launch {self.model_parallel_size * self.dp} processes (torchrun --nproc-per-node ...) "
                "or set parallel.dp=-1"
            )
        return dp

    def validate(
        self,
        *,
        world_size: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        num_experts: int | None,
        seq_len: int,
    ) -> int:
        """Check the layout against the model shape and the world size; return the data-parallel degree.

        Takes plain numbers so that ``parallel`` stays independent of the model code.
        """
        dp = self.resolve_dp(world_size)
        if num_heads % self.tp:
            raise ConfigError(f"parallel.tp={self.tp} does not divide the model's {num_heads} attention heads")
        if num_kv_heads % self.tp:
            raise ConfigError(
                f"parallel.tp={self.tp} does not divide the model's {num_kv_heads} key/value heads (GQA groups)"
            )
        stages = self.pp * self.vpp
        if num_layers % stages:
            what = f"parallel.pp × parallel.vpp = {self.pp} × {self.vpp}" if self.vpp > 1 else f"parallel.pp={self.pp}"
            raise ConfigError(f"{what} does not divide the model's {num_layers} layers")
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise ConfigError(
                f"sequence length {seq_len} is not divisible by 2 × parallel.cp = {2 * self.cp} (context parallel "
                "splits each sequence into 2 × cp equal chunks)"
            )
        # Sequence parallel splits what each context-parallel rank holds (seq_len / cp) over tp.
        if self.sequence_parallel and (seq_len // self.cp) % self.tp:
            what = f"sequence length {seq_len}"
            if self.cp > 1:
                what = f"sequence length / parallel.cp = {seq_len} / {self.cp}"
            raise ConfigError(f"{what} is not divisible by parallel.tp={self.tp} (sequence parallel)")
        if self.ep > 1:
            if not num_experts:
                raise ConfigError(f"parallel.ep={self.ep} needs a MoE model; this model has no experts")
            if num_experts % self.ep:
                raise ConfigError(f"parallel.ep={self.ep} does not divide the model's {num_experts} experts")
            etp = self.etp or self.tp
            # megatron-core folds expert parallelism into the tp × cp × dp ranks of each stage.
            if (self.tp * self.cp * dp) % (self.ep * etp):
                cp_names, cp_values = (" × parallel.cp", f" × {self.cp}") if self.cp > 1 else ("", "")
                raise ConfigError(
                    f"parallel.ep × expert tp = {self.ep} × {etp} must divide parallel.tp{cp_names} × dp = "
                    f"{self.tp}{cp_values} × {dp} (experts are spread over the data-parallel ranks)"
                )
        if self.zero in (2, 3) and dp < 2:
            raise ConfigError(f"parallel.zero={self.zero} shards over data-parallel ranks; it needs dp >= 2, got dp={dp}")
        return dp

    def describe(self, dp: int) -> str:
        parts = [f"tp={self.tp}{'+sp' if self.sequence_parallel else ''}", f"pp={self.pp}"]
        if self.cp > 1:
            parts.append(f"cp={self.cp}")
        if self.vpp > 1:
            parts.append(f"vpp={self.vpp}")
        if self.ep > 1:
            parts.append(f"ep={self.ep}")
        parts += [f"dp={dp}", f"zero={self.zero}{'+offload' if self.offload_optimizer else ''}"]
        return " ".join(parts)

