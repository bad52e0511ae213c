"""Process groups for a parallel layout: the only caller of megatron-core's ``initialize_model_parallel``."""
from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from parallel.config import ParallelConfig
from parallel.layout import ParallelLayout

log = logging.getLogger(__name__)


def world_size_from_env() -> int:
    """Processes in this job as the launcher (torchrun, srun) announced them; 1 when run bare."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_logging_rank() -> bool:
    """Rank 0, or a process without a process group: where one-per-job log lines are written."""
    return not dist.is_initialized() or dist.get_rank() == 0


def device() -> torch.device:
    """The one device seam: this rank's GPU when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Mesh:
    """Where this rank sits in the layout that actually ran: the resolved layout and this rank's coordinates."""

    rank: int
    layout: ParallelLayout
    tp_rank: int
    pp_rank: int
    dp_rank: int
    """Rank among the pure data-parallel replicas (context-parallel ranks of one replica share it)."""
    cp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0

    # The degrees, read from the one resolved layout.
    world_size = property(lambda self: self.layout.world_size)
    tp = property(lambda self: self.layout.tp)
    pp = property(lambda self: self.layout.pp)
    vpp = property(lambda self: self.layout.vpp)
    cp = property(lambda self: self.layout.cp)
    ep = property(lambda self: self.layout.ep)
    dp = property(lambda self: self.layout.dp)

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        vpp = f" vpp={self.vpp}" if self.vpp > 1 else ""
        ep = f" ep={self.ep}" if self.ep > 1 else ""
        cp, cp_rank = (f" cp={self.cp}", f" cp_rank={self.cp_rank}") if self.cp > 1 else ("", "")
        return (
            f"world={self.world_size} tp={self.tp} pp={self.pp}{cp}{vpp}{ep} dp={self.dp} "
            f"(rank {self.rank}: tp_rank={self.tp_rank} pp_rank={self.pp_rank}{cp_rank} dp_rank={self.dp_rank})"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(layout: ParallelLayout | ParallelConfig, *, seed: int, timeout_s: int | None = None) -> Mesh:
    """Start the default process group and megatron-core's model-parallel groups for ``layout``.

    ``layout``: the job's resolved layout (``pretrain.config.validate_job`` returns it, having checked it: errors
    here come from the launcher or the network, not from the config). A ``ParallelConfig`` (tests, benchmarks)
    is resolved against this job's world size by ``ParallelLayout.resolve`` and its ``timeout_s`` used.
    """
    if isinstance(layout, ParallelConfig):
        timeout_s = layout.timeout_s if timeout_s is None else timeout_s
        world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
        layout = ParallelLayout.resolve(layout, world_size=world)
    timeout_s = ParallelConfig().timeout_s if timeout_s is None else timeout_s
    # megatron-core's TP overlap orders kernels on a single CUDA work queue (it warns otherwise).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # A bare single process still needs a (1-rank) group: megatron-core's layers query it.
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"the layout was resolved for {layout.world_size} processes, but this job has "
                           f"{dist.get_world_size()}")
    from parallel.cpu_seam import apply_cpu_seam, model_parallel_seed

    apply_cpu_seam()  # a no-op with CUDA: GPU runs take megatron-core's own paths
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=timeout_s / 60,
    )
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    # As Megatron-LM: one seed per pipeline stage (stages hold different layers), the same on every
    # data-parallel replica; megatron's RNG tracker derives the per-TP-rank streams from it.
    stage_seed = seed + 100 * pp_rank
    torch.manual_seed(stage_seed)
    model_parallel_seed(stage_seed)
    # Without context parallel ranks: the cp ranks of one replica must read the same samples.
    if parallel_state.get_data_parallel_world_size(with_context_parallel=False) != layout.dp:
        raise RuntimeError(f"megatron-core built {parallel_state.get_data_parallel_world_size()} data-parallel "
                           f"replicas for a layout of dp={layout.dp}")
    mesh = Mesh(
        rank=dist.get_rank(),
        layout=layout,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=pp_rank,
        dp_rank=parallel_state.get_data_parallel_rank(with_context_parallel=False),
        cp_rank=parallel_state.get_context_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
    )
    if mesh.is_logging_rank:
        log.info("parallel layout: %s", mesh.describe())
    return mesh


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
