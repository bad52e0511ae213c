"""Distributed checkpoints (megatron-core ``torch_dist``): atomic publish, verification, keep-last-N, resume.

Layout under ``<run_dir>/checkpoints``::

    step_00000100/            complete checkpoint: renamed from step_00000100.tmp only after every rank wrote
        *.distcp, .metadata   megatron-core dist_checkpointing (model, optimizer shards, schedule, trainer state)
        rng/rank_00000.pt     each rank's RNG states (restored when the layout is unchanged)
        checksums.json        size and CRC32 of every file, checked before a load
    latest                    names the newest complete checkpoint; replaced atomically after the rename

A kill at any moment leaves either the previous ``latest`` or the new one, never a pointer to a partial
directory. A checkpoint that fails verification (truncated, corrupted) is skipped with a warning naming
it, and the newest one that verifies is used.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

log = logging.getLogger("pretrain")

_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # loadable under any layout
_CHECKSUMS = "checksums.json"


def unwrap(chunk):
    """The GPTModel inside the DDP and bf16 wrappers (checkpoint keys are the bare model's)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sharded_state(train_module, *, is_loading: bool, extra: dict) -> dict:
    chunks = [unwrap(c) for c in train_module.chunks]
    if len(chunks) == 1:
        state = {"model": chunks[0].sharded_state_dict()}
    else:
        state = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    state["optimizer"] = train_module.optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=_OPTIM_METADATA)
    state["scheduler"] = train_module.scheduler.state_dict()
    state.update(extra)
    return state


def _rng_state() -> dict:
    """Every RNG a rank uses, as tensors and plain numbers (loadable with ``weights_only=True``)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state.tolist()), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _file_checksums(directory: Path) -> dict[str, list[int]]:
    sums = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != _CHECKSUMS):
        crc = 0
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                crc = zlib.crc32(block, crc)
        sums[str(path.relative_to(directory))] = [path.stat().st_size, crc]
    return sums


def verify(directory: Path) -> str | None:
    """None if ``directory`` holds every file its checksums list, intact; else what is wrong."""
    listing = directory / _CHECKSUMS
    if not listing.is_file():
        return f"{_CHECKSUMS} is missing"
    try:
        expected = json.loads(listing.read_text())
    except json.JSONDecodeError:
        return f"{_CHECKSUMS} is unreadable"
    actual = _file_checksums(directory)
    for name, (size, crc) in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name][0] != size:
            return f"{name} has {actual[name][0]} bytes, expected {size} (truncated?)"
        if actual[name][1] != crc:
            return f"{name} fails its CRC32 check (corrupted)"
    return None


class Checkpointer:
    def __init__(self, root: Path, keep_last: int, *, async_save: bool = False) -> None:
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.async_save = async_save
        self._queue = None  # megatron-core's AsyncCallsQueue, created on the first asynchronous save
        self._verified: set[Path] = set()  # checksumming a large checkpoint is slow: once per process

    def _complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies: the ``latest`` pointer's, else the newest older one."""
        pointer = self.root / "latest"
        named = self.root / pointer.read_text().strip() if pointer.is_file() else None
        candidates = ([named] if named is not None else []) + [p for p in reversed(self._complete()) if p != named]
        for path in candidates:
            if not path.is_dir():
                log.warning("checkpoint %s named by %s does not exist; looking for an older one", path, pointer)
                continue
            problem = None if path in self._verified else verify(path)
            if problem is None:
                self._verified.add(path)
                return path
            log.warning("checkpoint %s is damaged (%s); falling back to an older one", path, problem)
        return None

    def save(self, step: int, train_module, trainer_state: dict) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self.wait()  # one save in flight at a time, published in order
        dist.barrier()
        state = _sharded_state(train_module, is_loading=False, extra={"trainer": trainer_state})
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
        if self.async_save:
            # The tensors are staged now; a background writer stores them while training goes on, and the
            # checkpoint is published (renamed, pointed to) once every rank's writer has finished.
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
            request.add_finalize_fn(lambda: self._publish(tmp, final))
            self._queue = self._queue or AsyncCallsQueue()
            self._queue.schedule_async_request(request)
            return final
        dist_checkpointing.save(state, str(tmp))
        dist.barrier()
        self._publish(tmp, final)
        dist.barrier()
        return final

    def poll(self) -> None:
        """Publish asynchronous saves whose writes have finished on every rank (collective, cheap)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until every asynchronous save is written and published (collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)

    def _publish(self, tmp: Path, final: Path) -> None:
        if dist.get_rank() == 0:
            (tmp / _CHECKSUMS).write_text(json.dumps(_file_checksums(tmp)))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the checkpoint is complete from here on ...
            pointer_tmp = self.root / "latest.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.root / "latest")  # ... and published from here on
            for old in self._complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("saved checkpoint %s", final)

    def load(self, path: Path, train_module) -> dict:
        """Load model, optimizer, schedule and RNG from ``path``; return the trainer state saved with them."""
        common = dist_checkpointing.load_common_state_dict(str(path))
        _materialise_optimizer_state(train_module.optimizer)
        state = _sharded_state(train_module, is_loading=True, extra={"trainer": common["trainer"]})
        loaded = dist_checkpointing.load(state, str(path))
        chunks = [unwrap(c) for c in train_module.chunks]
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"])
        with _keep_adam_step_on_load(train_module.optimizer):
            train_module.optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_step(train_module.optimizer)
        train_module.scheduler.load_state_dict(loaded["scheduler"])
        rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
        saved_world = len(list((path / "rng").glob("rank_*.pt")))
        if saved_world == dist.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("checkpoint %s was saved by %d ranks, this job has %d: RNG states start fresh",
                        path, saved_world, dist.get_world_size())
        return loaded["trainer"]


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state yet, and megatron-core's distributed optimizer can only describe
    (and so load into) states that exist: create them with its own dummy-value step first."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def _keep_adam_step_on_load(optimizer):
    """megatron-core 0.16.1 without apex/TransformerEngine (our CPU and GPU images alike): the reshardable
    parameter state it loads has no ``step``, yet it copies every torch-Adam state key, ``step`` included
    (KeyError). ``step`` is restored from the param groups instead; keep it out of the per-parameter copy."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def set_states(model_param, tensors, _opt=opt, _original=original):
            group, order = _opt.model_param_group_index_map[model_param]
            current = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]]
            if "step" in current and "step" not in tensors:
                tensors = {**tensors, "step": current["step"]}
            return _original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method


def _unshare_adam_step(optimizer) -> None:
    """After a dist-checkpoint load every parameter's Adam ``step`` is one shared tensor, so each
    ``optimizer.step()`` would advance it once per parameter: give each parameter its own copy."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is None:
            continue
        for param_state in torch_opt.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()
