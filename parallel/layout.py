"""The resolved parallel layout: every degree of a job, resolved once from ``ParallelConfig`` and the world size.

``ParallelConfig`` is what a user types (``parallel.etp`` may be null, ``parallel.dp`` may be -1); a
``ParallelLayout`` is what runs: every degree an integer, dp derived from the world size, checked once by
:meth:`ParallelLayout.resolve` (the world size) and :meth:`ParallelLayout.check_model` (the model's shape),
each raising a ``ConfigError`` that names the field. It is then handed explicitly to whoever needs it: the
process groups (``parallel.mesh.init_distributed``), megatron-core's ``TransformerConfig``
(``pretrain.models.decoder.model.transformer_config``), DDP/ZeRO, data sharding (through the ``Mesh``) and the
HF adapter's per-rank ``Layout`` (``pretrain.models.hf.sharding.Layout.of``). Modelled on torchtitan's
``ParallelDims`` and OLMo-core's ``build_world_mesh``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import ConfigError
from parallel.config import ParallelConfig


def expert_tensor_parallel(tp: int, etp: int | None) -> int:
    """The expert tensor-parallel degree: ``parallel.etp``, or tp when it is null (routed experts are then split
    like the dense MLP). The one place this rule is written."""
    return tp if etp is None else etp


def min_data_parallel(parallel: ParallelConfig) -> int:
    """``parallel.dp``, or with dp=-1 the smallest dp whose tp × cp × dp ranks hold the expert groups
    (megatron-core spreads ep × etp expert ranks over them): what a bare local launch starts."""
    if parallel.dp != -1:
        return parallel.dp
    experts = parallel.ep * expert_tensor_parallel(parallel.tp, parallel.etp)
    return experts // math.gcd(parallel.tp * parallel.cp, experts)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelLayout:
    """Every degree of a job, resolved (no None, no -1). Build it with :meth:`resolve`."""

    world_size: int
    tp: int
    pp: int
    vpp: int
    cp: int
    ep: int
    etp: int
    """Expert tensor-parallel degree (``parallel.etp``, or tp)."""
    dp: int
    """Pure data-parallel degree: replicas that read different samples (context-parallel ranks not counted)."""
    sequence_parallel: bool = False
    zero: int = 1
    """0 = plain DDP, 1 = megatron-core's distributed optimizer, 2/3 = DeepSpeed."""
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.model_parallel_size * self.dp != self.world_size:  # resolve() guarantees it; a hand-built one may not
            raise ConfigError(f"tp × pp × cp × dp = {self.tp} × {self.pp} × {self.cp} × {self.dp} is not the world "
                              f"size {self.world_size}")

    @classmethod
    def resolve(cls, parallel: ParallelConfig, *, world_size: int) -> ParallelLayout:
        """``parallel`` (checked field by field in its ``__post_init__``) on ``world_size`` processes: dp derived,
        etp defaulted, or a ConfigError naming the fields that do not fit the world size."""
        names = ["tp", "pp"] + (["cp"] if parallel.cp > 1 else [])
        values = [getattr(parallel, n) for n in names]
        model_parallel = math.prod(values)
        named, valued = " × ".join(f"parallel.{n}" for n in names), " × ".join(str(v) for v in values)
        if world_size % model_parallel:
            raise ConfigError(f"world size {world_size} is not divisible by {named} = {valued} = {model_parallel}")
        dp = world_size // model_parallel
        if parallel.dp != -1 and parallel.dp != dp:
            raise ConfigError(
                f"{named} × parallel.dp = {valued} × {parallel.dp} = {model_parallel * parallel.dp} processes, but "
                f"the world size is {world_size}; launch {model_parallel * parallel.dp} processes (torchrun "
                "--nproc-per-node ...) or set parallel.dp=-1"
            )
        return cls(world_size=world_size, tp=parallel.tp, pp=parallel.pp, vpp=parallel.vpp, cp=parallel.cp,
                   ep=parallel.ep, etp=expert_tensor_parallel(parallel.tp, parallel.etp), dp=dp,
                   sequence_parallel=parallel.sequence_parallel, zero=parallel.zero,
                   offload_optimizer=parallel.offload_optimizer)

    @classmethod
    def single(cls) -> ParallelLayout:
        """One process, nothing split."""
        return cls.resolve(ParallelConfig(), world_size=1)

    def check_model(self, *, num_layers: int, num_heads: int, num_kv_heads: int, num_experts: int | None,
                    seq_len: int) -> ParallelLayout:
        """Check the layout against the model's shape (plain numbers: ``parallel`` stays independent of the model
        code); returns itself, or raises a ConfigError naming the field."""
        if num_heads % self.tp:
            raise ConfigError(f"parallel.tp={self.tp} does not divide the model's {num_heads} attention heads")
        if num_kv_heads % self.tp:
            raise ConfigError(
                f"parallel.tp={self.tp} does not divide the model's {num_kv_heads} key/value heads (GQA groups)"
            )
        if num_layers % (self.pp * self.vpp):
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
            # megatron-core folds expert parallelism into the tp × cp × dp ranks of each stage.
            if (self.tp * self.cp * self.dp) % (self.ep * self.etp):
                cp_names, cp_values = (" × parallel.cp", f" × {self.cp}") if self.cp > 1 else ("", "")
                raise ConfigError(
                    f"parallel.ep × expert tp = {self.ep} × {self.etp} must divide parallel.tp{cp_names} × dp = "
                    f"{self.tp}{cp_values} × {self.dp} (experts are spread over the data-parallel ranks)"
                )
        if self.zero in (2, 3) and self.dp < 2:
            raise ConfigError(
                f"parallel.zero={self.zero} shards over data-parallel ranks; it needs dp >= 2, got dp={self.dp}")
        return self

    @property
    def model_parallel_size(self) -> int:
        """Ranks that share one data-parallel replica: tp × pp × cp (megatron-core's ``model_size``)."""
        return self.tp * self.pp * self.cp

    @property
    def expert_dp(self) -> int:
        """Data-parallel degree of the expert parameters: megatron folds ep × etp into tp × cp × dp."""
        return self.tp * self.cp * self.dp // (self.ep * self.etp)

    @property
    def deepspeed(self) -> bool:
        """ZeRO-2/3 run through DeepSpeed (data-parallel layouts only) instead of megatron-core's DDP."""
        return self.zero in (2, 3)

    def describe(self) -> str:
        parts = [f"tp={self.tp}{'+sp' if self.sequence_parallel else ''}", f"pp={self.pp}"]
        if self.cp > 1:
            parts.append(f"cp={self.cp}")
        if self.vpp > 1:
            parts.append(f"vpp={self.vpp}")
        if self.ep > 1:
            parts.append(f"ep={self.ep}")
        parts += [f"dp={self.dp}", f"zero={self.zero}{'+offload' if self.offload_optimizer else ''}"]
        return " ".join(parts)
