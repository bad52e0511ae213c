"""Multi-rank tests inside one pytest process (modelled on OLMo-core's ``run_distributed_test``).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes, gives each a process group
and calls the module-level ``fn(rank, world_size, *args, **kwargs)`` in it. It returns the per-rank
return values, re-raises the earliest failure (with that rank's traceback attached as a note), and
turns a hang into a ``TimeoutError`` after ``timeout`` seconds, having dumped every rank's Python
stack to stderr and killed them all. Ranks also die with the test process (Linux).

Start-up cost measured on the 2-core CPU box: ~0.1 s per call with fork (the default for gloo: ranks
inherit the test module's torch/megatron-core imports), 6-11 s with spawn (each rank re-imports them).
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port"]

# How long the other ranks get to report their own error once one rank has failed: usually they fail
# too (their peer left a collective), and the first error in time is the root cause.
_GRACE_AFTER_FAILURE_S = 3.0


def have_deepspeed() -> bool:
    """Whether DeepSpeed imports; imported (and patched) here, once, so that forked ranks inherit it."""
    try:
        from parallel.deepspeed import _import_deepspeed

        _import_deepspeed()
        return True
    except ImportError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when the test process dies (e.g. CI kills a hung pytest)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _child(rank: int, world_size: int, port: int, backend: str, timeout: float,
           fn: Callable[..., Any], args: tuple, kwargs: dict, conn) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    _die_with_parent()
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # its own process group: the parent can kill what the rank started, too
    # The parent sends SIGUSR1 on timeout: every thread's Python stack goes to stderr before the kill.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    phase = "init_process_group"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        phase = "fn"
        result = fn(rank, world_size, *args, **kwargs)
        try:
            payload = ("ok", pickle.dumps(result))
        except Exception:  # noqa: BLE001 - an unpicklable return value is this rank's error
            payload = ("error", (time.time(), "pickling the result", traceback.format_exc(), None))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        failed_at = time.time()  # the root cause is the earliest failure, not the first one reported
        tb = traceback.format_exc()
        try:
            blob = pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an unpicklable exception still reports its traceback
            blob = None
        payload = ("error", (failed_at, phase, tb, blob))
    try:
        conn.send(payload)  # before tearing down the group, which makes peers fail in turn
        conn.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()


class _Run:
    """One attempt: ``world_size`` children, their result pipes and the bookkeeping to collect them."""

    def __init__(self, ctx, fn, world_size, port, backend, timeout, args, kwargs):
        self.procs, self.conns = [], []
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, name=f"rank{rank}", daemon=False,
                            args=(rank, world_size, port, backend, timeout, fn, args, kwargs, send))
            p.start()
            send.close()  # the parent keeps only the reading end: EOF then means the child is gone
            self.procs.append(p)
            self.conns.append(recv)
        self.results: dict[int, Any] = {}
        # rank -> (time of failure, phase, traceback, pickled exception or None)
        self.errors: dict[int, tuple[float, str, str, bytes | None]] = {}

    def pending(self) -> list[int]:
        return [r for r in range(len(self.procs)) if r not in self.results and r not in self.errors]

    def collect(self, deadline: float) -> None:
        """Read results until every rank reported, or ``deadline`` passes."""
        while self.pending():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            waitables = {}
            for r in self.pending():
                waitables[self.conns[r]] = r
                waitables[self.procs[r].sentinel] = r
            for ready in wait(list(waitables), timeout=left):
                r = waitables[ready]
                if r not in self.pending():
                    continue
                try:
                    status, body = self.conns[r].recv()
                except (EOFError, OSError):  # died without reporting: segfault, os._exit, OOM kill
                    self.procs[r].join(1)
                    status, body = "error", (time.time(), "exit", f"rank {r} exited with code "
                                             f"{self.procs[r].exitcode} before reporting a result\n", None)
                if status == "ok":
                    self.results[r] = pickle.loads(body)
                else:
                    self.errors[r] = body

    def stop(self, *, dump_stacks: bool, grace: float) -> None:
        """Reap the ranks: wait up to ``grace`` seconds for them to exit (flushing their output), then
        kill the rest, after dumping their Python stacks one rank at a time if ``dump_stacks``."""
        end = time.monotonic() + grace
        for p in self.procs:
            p.join(max(0.0, end - time.monotonic()))
        if dump_stacks:
            for p in self.procs:
                if p.is_alive():
                    try:
                        os.kill(p.pid, signal.SIGUSR1)
                    except ProcessLookupError:
                        pass
                    time.sleep(0.3)  # one rank at a time: the dumps share the parent's stderr
        for p in self.procs:
            _kill_group(p.pid)  # the rank, if still running, and anything it started and left behind
        for p in self.procs:
            p.join(5)
        for c in self.conns:
            c.close()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        pass


def _address_in_use(run: _Run) -> bool:
    return any(phase == "init_process_group" and ("EADDRINUSE" in tb or "ddress already in use" in tb)
               for _, phase, tb, _ in run.errors.values())


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120,
                    backend: str = "gloo", start_method: str | None = None, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return its per-rank results.

    ``fn`` should be a module-level function (spawned ranks import it by name); its return value
    (and, with spawn, its arguments) must pickle. Each child gets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK`` and ``OMP_NUM_THREADS=1``, an initialised default process group (``backend``, with
    ``timeout`` as its collective timeout) and ``destroy_process_group`` in ``finally``.

    ``start_method``: ``"fork"`` (default for gloo: children inherit the parent's imports, so nothing is
    imported twice) or ``"spawn"`` (default otherwise, needed for CUDA: a fresh interpreter per rank,
    which re-imports torch and megatron-core, several seconds per rank).

    Raises the earliest failing rank's exception (same type, with the rank and its remote traceback
    added as a note; a ``RuntimeError`` when it cannot be unpickled): peers of a failed rank usually
    fail next, in the collective it left. Raises ``TimeoutError`` when a rank has neither returned nor
    failed after ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if start_method is None:
        start_method = "fork" if backend == "gloo" and "fork" in mp.get_all_start_methods() else "spawn"
    if start_method == "fork" and dist.is_initialized():
        raise RuntimeError("run_distributed: this process already has a process group, which forked "
                           "children would inherit; destroy it or pass start_method='spawn'")
    ctx = mp.get_context(start_method)
    for attempt in range(3):
        run = _Run(ctx, fn, world_size, free_port(), backend, timeout, args, kwargs)
        deadline = time.monotonic() + timeout
        try:
            run.collect(deadline)
            if run.errors and run.pending():  # peers of a failed rank usually fail or hang: brief grace
                run.collect(min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S))
        finally:
            hung = run.pending()
            # All reported: let them exit normally. A failure or a hang: kill now (peers of a failed
            # rank usually wait in a collective); on a pure hang, dump every stack first.
            run.stop(dump_stacks=bool(hung) and not run.errors, grace=0.0 if hung or run.errors else 10.0)
        # Another process took the port between free_port() and rank 0's bind: retry on a new port.
        if run.errors and _address_in_use(run) and attempt < 2:
            continue
        break
    if run.errors:
        order = sorted(run.errors, key=lambda r: run.errors[r][0])
        rank, others = order[0], order[1:]
        _, phase, tb, blob = run.errors[rank]
        note = (f"[rank {rank} of {world_size}, in {phase}] remote traceback:\n{tb}"
                + (f"(ranks {others} failed too; ranks {hung} were still running and were killed)"
                   if others or hung else ""))
        exc = None
        if blob is not None:
            try:
                exc = pickle.loads(blob)
            except Exception:  # noqa: BLE001
                exc = None
        if not isinstance(exc, BaseException):
            raise RuntimeError(f"rank {rank} failed in {phase}:\n{tb}")
        exc.add_note(note)
        raise exc
    if hung:
        raise TimeoutError(
            f"run_distributed({getattr(fn, '__name__', fn)}): ranks {hung} of {world_size} did not finish "
            f"within {timeout:.0f}s (a collective some rank never joined?); their Python stacks were "
            "dumped to stderr and all ranks were killed")
    return [run.results[r] for r in range(world_size)]
