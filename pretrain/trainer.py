"""The training loop: a recipe that fits on a screen. Model specifics live in TrainModule, extras in callbacks."""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.errors import TrainingDivergedError
from parallel.mesh import Mesh, device
from pretrain.callbacks import Callback
from pretrain.checkpoint import Checkpointer
from pretrain.train_module import BaseTrainModule

log = logging.getLogger("pretrain")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # Slurm preemption / time limit


class Trainer:
    def __init__(self, *, module: BaseTrainModule, batches_from, checkpointer: Checkpointer, callbacks: list[Callback],
                 mesh: Mesh, steps: int, save_every: int, max_bad_steps: int = 5,
                 inject_nan_steps: tuple[int, ...] = (), eval_batches=None, eval_every: int = 0,
                 eval_position_buckets: int = 0, eval_at_start: bool = False) -> None:
        self.module = module
        self.batches_from = batches_from  # step -> iterator of per-step microbatch lists
        self.checkpointer = checkpointer
        self.callbacks = callbacks
        self.mesh = mesh
        self.steps = steps
        self.save_every = save_every
        self.max_bad_steps = max_bad_steps
        self.inject_nan_steps = set(inject_nan_steps)
        self.eval_batches = eval_batches  # () -> iterable of this rank's validation microbatch lists
        self.eval_every = eval_every if eval_batches is not None else 0
        self.eval_position_buckets = eval_position_buckets
        self.eval_at_start = eval_at_start and self.eval_every > 0
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self._bad_in_a_row = 0
        self._stop_signal: int | None = None

    # Stateful: the checkpointer saves this next to the model and optimizer.
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def resume_if_possible(self) -> None:
        latest = self.checkpointer.latest()
        if latest is not None:
            self.load_state_dict(self.checkpointer.load(latest, self.module))
            log.info("resumed from %s at step %d", latest, self.step)

    def fit(self) -> None:
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self._call("on_train_start")
            if self.eval_at_start and self.step == 0:  # the weights this run starts from (a stage's "before")
                self._call("on_eval", 0, self.evaluate())
            batches = self.batches_from(self.step)
            saved_at = None
            while self.step < self.steps:
                result = self.module.train_batch(next(batches), poison=self.step + 1 in self.inject_nan_steps)
                self.step += 1
                self.tokens_seen += result.tokens
                self._check_finite(result)
                metrics: dict = {"skipped_steps": self.skipped_steps, "tokens_seen": self.tokens_seen,
                                 **result.extras}
                # Every eval_every steps and after the last one; logged with the step it follows.
                if self.eval_every and (self.step % self.eval_every == 0 or self.step == self.steps):
                    metrics.update(self.evaluate())
                self._call("on_step_end", self.step, result, metrics)
                # No periodic save inside a bad streak: the last good checkpoint stays the newest.
                if self.save_every and self.step % self.save_every == 0 and not result.skipped:
                    self.checkpointer.save(self.step, self.module, self.state_dict())
                    saved_at = self.step
                self.checkpointer.poll()
                if self._stop_requested():
                    log.warning("stop signal received: saving at step %d and exiting", self.step)
                    break
            if saved_at != self.step:
                self.checkpointer.save(self.step, self.module, self.state_dict())
            self.checkpointer.wait()
            self._call("on_train_end")
        except BaseException as exc:
            self._call("on_error", exc)
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def evaluate(self) -> dict:
        """Validation loss on the fixed validation batches (collective: every rank calls it)."""
        start = time.perf_counter()
        loss, tokens, by_position = self.module.evaluate_by_position(self.eval_batches(), self.eval_position_buckets)
        metrics = {"eval/loss": loss, "eval/tokens": tokens}
        for bucket in by_position:  # the loss of tokens predicted from a context of [start, end) tokens
            metrics[f"eval/loss_pos_{bucket.start}_{bucket.end}"] = bucket.loss
        return {**metrics, "eval/time_s": time.perf_counter() - start}

    def _check_finite(self, result) -> None:
        if not result.skipped:
            self._bad_in_a_row = 0
            return
        self.skipped_steps += 1
        self._bad_in_a_row += 1
        log.warning("step %d skipped: loss %s, grad norm %s (%d in a row)", self.step, result.loss,
                    result.grad_norm, self._bad_in_a_row)
        if self._bad_in_a_row >= self.max_bad_steps:
            last = self.checkpointer.latest()
            raise TrainingDivergedError(
                f"stopping at step {self.step}: {self._bad_in_a_row} consecutive steps had a non-finite loss or "
                f"gradient norm (trainer.max_bad_steps={self.max_bad_steps}); last good checkpoint: "
                f"{last if last else 'none saved yet'} (left as it is)"
            )

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        # The signal may reach only some ranks: agree on stopping so every rank saves the same step.
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)
