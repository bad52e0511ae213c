"""Data parallelism: megatron-core's DDP with contiguous gradient buckets (and ZeRO-1 sharding)."""
from __future__ import annotations

import logging

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel.mesh import is_logging_rank

log = logging.getLogger(__name__)


def apply_ddp(
    chunks: list[torch.nn.Module],
    config: TransformerConfig,
    *,
    zero: int,
    overlap_grad_reduce: bool = False,
) -> list[DistributedDataParallel]:
    """Wrap each model chunk in megatron-core's DDP.

    Gradients are reduced in fp32 (``grad_reduce_in_fp32``) whatever the parameter dtype. ZeRO-1
    (``zero=1``) makes the buffers reduce-scatter so the distributed optimizer keeps only its shard.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=zero == 1,
    )
    wrapped = [
        # Bucketing only for the first chunk, as megatron-core's trainer does for interleaved pipelines.
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()  # every data-parallel replica starts from rank 0's weights
    if is_logging_rank():
        log.info("data parallel: megatron-core DDP on %d chunk%s, fp32 gradient reduction%s%s", len(wrapped),
                 "s" if len(wrapped) > 1 else "", ", ZeRO-1 (distributed optimizer)" if zero == 1 else "",
                 ", overlapped with backward" if overlap_grad_reduce else "")
    return wrapped
