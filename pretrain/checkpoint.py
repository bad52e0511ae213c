"""Checkpoints of megatron-core and DeepSpeed runs: atomic publish, verification, keep-last-N, resume.

Layout under ``<run_dir>/checkpoints``::

    step_00000100/            complete checkpoint: renamed from step_00000100.tmp only after every rank wrote
        *.distcp, .metadata   parallel.zero 0/1: megatron-core dist_checkpointing (model, optimizer shards,
                              schedule, trainer state)
        *_model_states.pt     parallel.zero 2/3: DeepSpeed's own ``engine.save_checkpoint`` files (the step
        *_optim_states.pt     directory is its tag); schedule and trainer state ride in its client_state
        deepspeed.json        parallel.zero 2/3: the ZeRO stage and dp size, which a resume must match
        rope.json             the RoPE base and scaling the weights were trained with (checked on resume/init_from)
        rng/rank_00000.pt     each rank's RNG states (restored when the layout is unchanged)
        checksums.json        size and CRC32 of every file, checked before a load
    latest                    names the newest complete checkpoint; replaced atomically after the rename
    zero_to_fp32.py           parallel.zero 2/3: DeepSpeed's consolidation script, copied by DeepSpeed; our
                              ``latest`` has its format, so ``python zero_to_fp32.py <checkpoints> <out>`` works

A kill at any moment leaves either the previous ``latest`` or the new one, never a pointer to a partial
directory. A checkpoint that fails verification (truncated, corrupted) is skipped with a warning naming
it, and the newest one that verifies is used. Rank 0 alone reads the files to verify them and
broadcasts its choice, so a checkpoint is checksummed once per job, not once per process.

What a train module writes and reads is the only difference between the two: its ``checkpoint_state()``
(``TorchDistState``, ``DeepSpeedState``: the ``CheckpointState`` interface); the temporary directory, checksums,
publishing, pruning and RNG files are shared.
"""
from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
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

from common.errors import CheckpointError, ConfigError

log = logging.getLogger("pretrain")

_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # loadable under any layout
_CHECKSUMS = "checksums.json"
_DEEPSPEED_LAYOUT = "deepspeed.json"
_ROPE = "rope.json"


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


def _write_rng(tmp: Path, state: dict) -> None:
    """This rank's RNG file, written once the backend has started its save: megatron-core's
    ``dist_checkpointing.save`` warns "Overwriting old incomplete / corrupted checkpoint" whenever the
    folder it is given is not empty. The file's place (``rng/rank_NNNNN.pt``) is what resume reads."""
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(state, tmp / "rng" / f"rank_{dist.get_rank():05d}.pt")


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
    def __init__(self, root: Path, keep_last: int, *, async_save: bool = False, rope: dict | None = None) -> None:
        self.root = Path(root)
        self.rope = rope  # written as rope.json (pretrain/models/rope_scaling.py: record)
        self.keep_last = max(1, keep_last)
        self.async_save = async_save
        self._queue = None  # megatron-core's AsyncCallsQueue, created on the first asynchronous save
        self._verified: set[Path] = set()  # checksumming a large checkpoint is slow: once per process

    def _complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def remove_leftovers(self) -> None:
        """Delete what saves cut short (a kill, a full disk) left behind: ``step_*.tmp`` folders and
        ``latest.tmp``. Call once at start, before any save; rank 0 alone deletes (no other rank touches a
        ``.tmp`` folder before ``save``, whose barrier follows rank 0's own clean-up of it)."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        leftovers = sorted(p for p in self.root.glob("step_*.tmp") if p.is_dir())
        leftovers += [p for p in (self.root / "latest.tmp",) if p.is_file()]
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if leftovers:
            log.warning("removed %d leftover(s) of unfinished saves in %s: %s", len(leftovers), self.root,
                        ", ".join(p.name for p in leftovers))

    def _candidates(self) -> list[Path]:
        """Complete checkpoints, newest first: the ``latest`` pointer's, then the others by step."""
        pointer = self.root / "latest"
        named = self.root / pointer.read_text().strip() if pointer.is_file() else None
        return ([named] if named is not None else []) + [p for p in reversed(self._complete()) if p != named]

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies: the ``latest`` pointer's, else the newest older one.

        Collective when a process group of several ranks exists (every rank must call it): rank 0 reads
        and checks the files, the others take its verdict.
        """
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        chosen = self._verify_newest() if not distributed or dist.get_rank() == 0 else None
        if distributed:
            verdict = [str(chosen) if chosen is not None else None]
            dist.broadcast_object_list(verdict, src=0)
            chosen = Path(verdict[0]) if verdict[0] is not None else None
        return chosen

    def _verify_newest(self) -> Path | None:
        for path in self._candidates():
            if not path.is_dir():
                log.warning("checkpoint %s named by %s does not exist; looking for an older one", path,
                            self.root / "latest")
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
            tmp.mkdir(parents=True)
        self.wait()  # one save in flight at a time, published in order
        dist.barrier()
        backend = train_module.checkpoint_state()
        rng = _rng_state()  # as of this step; written after the backend's files (see _write_rng)
        if self.async_save:
            # The tensors are staged now; a background writer stores them while training goes on, and the
            # checkpoint is published (renamed, pointed to) once every rank's writer has finished.
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            request = backend.write_async(tmp, trainer_state)
            _write_rng(tmp, rng)  # before this rank can vote the save finished, so before the publish
            request.add_finalize_fn(lambda: self._publish(tmp, final))
            self._queue = self._queue or AsyncCallsQueue()
            self._queue.schedule_async_request(request)
            return final
        backend.write(tmp, trainer_state)
        _write_rng(tmp, rng)
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
            if self.rope is not None:  # after the backend's files: megatron warns about a non-empty folder
                (tmp / _ROPE).write_text(json.dumps(self.rope))
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
        backend = train_module.checkpoint_state()
        check_resumable(path, zero=backend.zero, dp=train_module.layout.dp)
        trainer_state = backend.read(path)
        rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
        saved_world = len(list((path / "rng").glob("rank_*.pt")))
        if saved_world == dist.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("checkpoint %s was saved by %d ranks, this job has %d: RNG states start fresh",
                        path, saved_world, dist.get_world_size())
        return trainer_state


class CheckpointState(ABC):
    """A train module's state as a checkpoint writes and reads it (``BaseTrainModule.checkpoint_state()``)."""

    zero: int | None = None
    """The DeepSpeed ZeRO stage whose partitions it writes; None: megatron-core ``torch_dist`` (any layout loads it)."""

    def __init__(self, train_module) -> None:
        self.train_module = train_module

    @abstractmethod
    def write(self, tmp: Path, trainer_state: dict) -> None:
        """Write the state (and ``trainer_state``) into the temporary checkpoint directory ``tmp`` (collective)."""

    @abstractmethod
    def write_async(self, tmp: Path, trainer_state: dict):
        """Stage the state and return an AsyncRequest that writes it in the background."""

    @abstractmethod
    def read(self, path: Path) -> dict:
        """Load the state from ``path`` into the train module; return the trainer state saved with it."""


class TorchDistState(CheckpointState):
    """parallel.zero 0/1: megatron-core model chunks, (distributed) optimizer and schedule as ``torch_dist``."""

    def write(self, tmp: Path, trainer_state: dict) -> None:
        dist_checkpointing.save(_sharded_state(self.train_module, is_loading=False, extra={"trainer": trainer_state}),
                                str(tmp))

    def write_async(self, tmp: Path, trainer_state: dict):
        """Stage the tensors and return megatron-core's AsyncRequest, which writes them in the background."""
        return dist_checkpointing.save(
            _sharded_state(self.train_module, is_loading=False, extra={"trainer": trainer_state}), str(tmp),
            async_sharded_save=True)

    def read(self, path: Path) -> dict:
        train_module = self.train_module
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
        return loaded["trainer"]


class DeepSpeedState(CheckpointState):
    """parallel.zero 2/3: DeepSpeed's own checkpoint of the engine (model, fp32 master and Adam partitions,
    its step counters), so its tooling (zero_to_fp32) reads ours; our LR schedule and trainer state go
    in its client_state."""

    def __init__(self, train_module) -> None:
        super().__init__(train_module)
        self.zero = train_module.zero

    def write(self, tmp: Path, trainer_state: dict) -> None:
        train_module = self.train_module
        # The tag is the step directory's name under the checkpoint root: DeepSpeed's own layout. It must
        # not write its `latest` (same name and format as ours): ours is set only once the step is complete.
        train_module.engine.save_checkpoint(
            str(tmp.parent), tag=tmp.name, save_latest=False,
            client_state={"scheduler": train_module.scheduler.state_dict(), "trainer": trainer_state})
        if dist.get_rank() == 0:
            (tmp / _DEEPSPEED_LAYOUT).write_text(json.dumps({"zero_stage": train_module.zero, "dp": train_module.dp}))

    def write_async(self, tmp: Path, trainer_state: dict):
        raise CheckpointError("trainer.async_save=true is not supported with DeepSpeed (parallel.zero=2/3)")

    def read(self, path: Path) -> dict:
        from parallel.deepspeed import weights_only_loads

        train_module = self.train_module
        # The schedule is ours (the engine has none): it comes back through client_state.
        with weights_only_loads():
            loaded, client = train_module.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                                 load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no model states in {path}")
        train_module.scheduler.load_state_dict(client["scheduler"])
        return client["trainer"]


def saved_rope(path: Path) -> dict | None:
    """The RoPE record of a checkpoint (None: written before checkpoints recorded it)."""
    marker = Path(path) / _ROPE
    return json.loads(marker.read_text()) if marker.is_file() else None


def saved_deepspeed_layout(path: Path) -> dict | None:
    """``{"zero_stage": .., "dp": ..}`` of a checkpoint a DeepSpeed run wrote; None for a megatron-core one."""
    marker = Path(path) / _DEEPSPEED_LAYOUT
    return json.loads(marker.read_text()) if marker.is_file() else None


def check_resumable(path: Path, *, zero: int | None, dp: int) -> None:
    """Refuse, naming the fields, a checkpoint this layout cannot load. DeepSpeed loads its ZeRO
    partitions only at the stage and dp size that wrote them (megatron-core's ``torch_dist`` reshards
    freely), and neither backend reads the other's optimizer state. ``zero`` None: a megatron-core run."""
    saved = saved_deepspeed_layout(path)
    init_hint = f"or start a new run from its weights with model.init_from={path}"
    if saved is None:
        if zero in (2, 3):
            raise ConfigError(f"parallel.zero={zero} (DeepSpeed) cannot resume {path}, a megatron-core torch_dist "
                              f"checkpoint: resume it with parallel.zero=0 or 1, {init_hint}")
        return
    stage, saved_dp = saved["zero_stage"], saved["dp"]
    if (zero, dp) != (stage, saved_dp):
        this = f"parallel.zero={zero}" if zero is not None else "a megatron-core run (parallel.zero=0/1)"
        raise ConfigError(
            f"{this} with parallel.dp={dp} cannot resume {path}: DeepSpeed ZeRO-{stage} saved it at dp={saved_dp}, "
            f"and its partitions load only at that stage and dp size. Resume with parallel.zero={stage} "
            f"parallel.dp={saved_dp}, {init_hint}")


def check_run_resumable(root: Path, *, zero: int, dp: int) -> Path | None:
    """``check_resumable`` against the checkpoint a resume would load: the newest that verifies
    (``Checkpointer.latest``, so a damaged newest one is skipped here as it is there). Without a process
    group it reads the files itself; with one it is collective (rank 0 verifies, every rank gets its choice).
    Returns that checkpoint (None: the run starts fresh)."""
    latest = Checkpointer(root, keep_last=1).latest()
    if latest is not None:
        check_resumable(latest, zero=zero, dp=dp)
    return latest


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
