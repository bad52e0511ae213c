"""Distributed checkpoints (megatron-core ``torch_dist``): atomic publish, keep-last-N, resume from latest.

Layout under ``<run_dir>/checkpoints``::

    step_00000100/      a complete checkpoint (renamed from step_00000100.tmp only after every rank wrote)
    latest              text file naming the newest complete checkpoint, replaced atomically
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

log = logging.getLogger(__name__)

_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # loadable under any layout


def _model_state(chunks, *, for_load: bool = False) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _sharded_state(train_module, extra: dict, *, is_loading: bool) -> dict:
    state = _model_state(train_module.chunks)
    state["optimizer"] = train_module.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=_OPTIM_METADATA
    )
    state["scheduler"] = train_module.scheduler.state_dict()
    state.update(extra)
    return state


class Checkpointer:
    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, step: int, train_module, trainer_state: dict) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = _sharded_state(train_module, {"trainer": trainer_state}, is_loading=False)
        dist_checkpointing.save(state, str(tmp))
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = self.root / "latest.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.root / "latest")
            self._prune()
            log.info("saved checkpoint %s", final)
        dist.barrier()
        return final

    def load(self, path: Path, train_module) -> dict:
        """Load model, optimizer and schedule from ``path``; return the trainer state saved with them."""
        common = dist_checkpointing.load_common_state_dict(str(path))
        state = _sharded_state(train_module, {"trainer": common["trainer"]}, is_loading=True)
        loaded = dist_checkpointing.load(state, str(path))
        if len(train_module.chunks) == 1:
            train_module.chunks[0].load_state_dict(loaded["model"])
        else:
            for i, chunk in enumerate(train_module.chunks):
                chunk.load_state_dict(loaded[f"model{i}"])
        train_module.optimizer.load_state_dict(loaded["optimizer"])
        train_module.scheduler.load_state_dict(loaded["scheduler"])
        return loaded["trainer"]

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
