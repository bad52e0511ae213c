"""The one local launcher, shared by ``python -m pretrain`` and ``python -m pretrain.convert``: how many processes a
bare command starts on this machine, and its re-run under torchrun with that many.

Under torchrun, srun or a test harness (``RANK`` set) a command joins the job it was started in instead.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from parallel.config import ParallelConfig
from parallel.layout import min_data_parallel

log = logging.getLogger(__name__)


def launched() -> bool:
    """Whether this process is one rank of a job a launcher started (torchrun, srun, ``run_distributed``)."""
    return "RANK" in os.environ


def local_world_size(parallel: ParallelConfig) -> int:
    """Processes a bare local launch starts: tp × pp × cp × dp, with dp=-1 meaning the smallest that holds the
    expert-parallel groups (``parallel.layout.min_data_parallel``)."""
    return parallel.tp * parallel.pp * parallel.cp * min_data_parallel(parallel)


def relaunch_local(module: str, args: list[str], nproc: int) -> int:
    """Run ``python -m <module> <args>`` as ``nproc`` local processes under torchrun; return its exit status.

    Each process gets an equal share of the CPU cores for its threads unless ``OMP_NUM_THREADS`` is set."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log.info("starting %d local processes: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd, env=env).returncode
