"""One optimizer step of Qwen2 on megatron-core: the model-specific half of training (the Trainer is the other)."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_batch_on_this_cp_rank

from parallel.layout import ParallelLayout
from parallel.mesh import device
from pretrain.checkpoint import CheckpointState, TorchDistState


@dataclass
class StepResult:
    loss: float
    """Mean next-token cross-entropy over every token of the global batch."""
    grad_norm: float
    lr: float
    tokens: int
    """Tokens that counted in the loss, over the global batch."""
    skipped: bool = False
    """True when the step was not applied (non-finite loss or gradients)."""
    extras: dict = field(default_factory=dict)
    """Model-specific figures (MoE: auxiliary losses, tokens per expert)."""


def _loss_func(loss_mask: torch.Tensor, poison: bool, positions, per_token_loss: torch.Tensor):
    # Per-token sums: megatron-core divides the gradients by the global token count (calculate_per_token_loss).
    mask = loss_mask.reshape(-1).float()
    losses = per_token_loss.float().reshape(-1)
    if poison:  # testing hook (trainer.inject_nan_steps): a non-finite loss and gradients, as a real blow-up gives
        losses = losses * float("nan")
    loss_sum = (losses * mask).sum()
    n_tokens = mask.sum().to(torch.int)
    report = {"lm": torch.stack([loss_sum.detach(), mask.sum()])}
    if positions is not None:  # evaluation by token position: (position_ids, buckets, width)
        report["pos"] = position_sums(losses.detach() * mask, mask, *positions)
    return loss_sum, n_tokens, report


def position_sums(weighted: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, buckets: int,
                  width: int) -> torch.Tensor:
    """[2, buckets] float64: per position bucket, the sum of masked per-token losses and the token count.

    Positions are the sequence's own (position_ids: under context parallelism each rank's 2 chunks keep their
    true positions), so the buckets of all ranks add up to those of one process."""
    index = (position_ids.reshape(-1).to(weighted.device) // width).clamp_(max=buckets - 1)
    out = torch.zeros(2, buckets, dtype=torch.float64, device=weighted.device)
    out[0].index_add_(0, index, weighted.to(torch.float64))
    out[1].index_add_(0, index, mask.to(torch.float64))
    return out


def _forward_step(poison: bool, buckets: tuple[int, int] | None, data_iterator, model):
    # Context parallel: every cp rank of a replica reads the same samples and keeps its 2 of 2 × cp
    # sequence chunks (r and 2cp-1-r), the layout megatron-core's RoPE slices its frequencies for, so
    # positions are right without touching position_ids. A copy: the microbatch dicts are reused
    # (one pass per virtual pipeline stage). Per-token loss sums over cp ranks add up to the full sum.
    batch = get_batch_on_this_cp_rank(dict(next(data_iterator)))
    dev = device()
    tokens, labels = batch["tokens"].to(dev), batch["labels"].to(dev)
    output = model(tokens, batch["position_ids"].to(dev), None, labels=labels)
    positions = (batch["position_ids"], *buckets) if buckets else None
    return output, partial(_loss_func, batch["loss_mask"].to(dev), poison, positions)


@dataclass(frozen=True)
class PositionBucket:
    start: int
    end: int
    """Token positions [start, end) of the sequence (the context a token is predicted from)."""
    loss: float
    tokens: int


class _NonFiniteGradNorm(Exception):
    pass


class BaseTrainModule(ABC):
    """What the Trainer and the Checkpointer see of a train module: one optimizer step, evaluation, and the state a
    checkpoint holds. Implemented by :class:`TrainModule` (megatron-core DDP / ZeRO-1) and
    ``pretrain.deepspeed_module.DeepSpeedTrainModule`` (DeepSpeed ZeRO-2/3); the Trainer does not know which."""

    layout: ParallelLayout
    """The resolved layout it was built for."""
    config: TransformerConfig
    scheduler: OptimizerParamScheduler

    @abstractmethod
    def train_batch(self, microbatches: list[dict[str, torch.Tensor]], *, poison: bool = False) -> StepResult:
        """Forward/backward over the microbatches, then one optimizer step unless loss or gradients are not finite.
        ``poison``: testing hook (``trainer.inject_nan_steps``), a non-finite loss as a real blow-up gives."""

    @abstractmethod
    def evaluate_by_position(self, batches, buckets: int) -> tuple[float, int, list[PositionBucket]]:
        """:meth:`evaluate` plus the loss in ``buckets`` equal slices of the sequence positions [0, seq_len)."""

    def evaluate(self, batches) -> tuple[float, int]:
        """Validation: (mean loss, tokens) over ``batches``, each one global batch's microbatches for this rank.

        The training loss exactly (per-token sums over every token of every batch, one global mean), forward
        only, in eval mode (no dropout) and without gradients: weights, optimizer, gradient buffers and RNG
        states are left as they were.
        """
        loss, tokens, _ = self.evaluate_by_position(batches, 0)
        return loss, tokens

    @abstractmethod
    def checkpoint_state(self) -> CheckpointState:
        """How its model, optimizer and schedule go into a checkpoint and back (``pretrain.checkpoint``)."""


class TrainModule(BaseTrainModule):
    """Model chunks + optimizer + LR schedule, and ``train_batch`` that runs one optimizer step."""

    def __init__(self, chunks: list, config: TransformerConfig, optimizer: MegatronOptimizer,
                 scheduler: OptimizerParamScheduler, *, layout: ParallelLayout, seq_len: int, micro_batch_size: int,
                 moe_stats=None) -> None:
        self.chunks = chunks
        self.layout = layout
        self.config = config
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.moe_stats = moe_stats
        assert config.calculate_per_token_loss  # set by build_train_module before DDP reads it
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        self._forward_backward = get_forward_backward_func()
        self._guard_grad_norm()

    def train_batch(self, microbatches: list[dict[str, torch.Tensor]], *, poison: bool = False) -> StepResult:
        """Forward/backward over the microbatches, then one optimizer step unless loss or gradients are not finite."""
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run_schedule(microbatches, poison=poison, forward_only=False)
        loss, tokens = _global_loss(reports, tp=self.layout.tp)
        extras = self.moe_stats.collect(len(microbatches)) if self.moe_stats is not None else {}
        lr = self.optimizer.param_groups[0]["lr"]
        if not math.isfinite(loss):  # the same global value on every rank, so all ranks skip together
            return StepResult(loss=loss, grad_norm=float("nan"), lr=lr, tokens=tokens, skipped=True, extras=extras)
        self.scheduler.step(increment=1)  # the LR of step s is the schedule at s (no wasted 0-LR step)
        try:
            ok, grad_norm, _ = self.optimizer.step()
        except _NonFiniteGradNorm as bad:
            self.scheduler.step(increment=-1)  # the step did not happen: neither does its LR change
            return StepResult(loss=loss, grad_norm=bad.args[0], lr=lr, tokens=tokens, skipped=True, extras=extras)
        return StepResult(
            loss=loss,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"],
            tokens=tokens,
            skipped=not ok,
            extras=extras,
        )

    def evaluate_by_position(self, batches, buckets: int) -> tuple[float, int, list[PositionBucket]]:
        """``evaluate`` plus the loss in ``buckets`` equal slices of the sequence positions [0, seq_len), forward
        only through the same pipeline schedule as training."""
        reports = []
        spec = (buckets, self.seq_len // buckets) if buckets else None
        for chunk in self.chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                for microbatches in batches:
                    reports += self._run_schedule(microbatches, poison=False, forward_only=True, buckets=spec)
        finally:
            for chunk in self.chunks:
                chunk.train()
        loss, tokens = _global_loss(reports, tp=self.layout.tp)
        by_position = global_position_losses([r["pos"] for r in reports], spec, tp=self.layout.tp) if spec else []
        return loss, tokens, by_position

    def checkpoint_state(self) -> CheckpointState:
        return TorchDistState(self)

    def _run_schedule(self, microbatches: list[dict[str, torch.Tensor]], *, poison: bool,
                      forward_only: bool, buckets: tuple[int, int] | None = None) -> list:
        """One pass of megatron's pipeline schedule over ``microbatches``; returns the per-microbatch reports."""
        # Every virtual stage replays the same microbatches through its own iterator.
        iterators = [iter(microbatches) for _ in self.chunks]
        return self._forward_backward(
            forward_step_func=partial(_forward_step, poison, buckets),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(microbatches),
            seq_length=self.seq_len,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )

    def _guard_grad_norm(self) -> None:
        """Abort ``optimizer.step()`` before clipping and updating when the global grad norm is not finite.

        The norm is all-reduced over every model-parallel rank, so all ranks abort together.
        """
        compute = self.optimizer.get_grad_norm

        def checked() -> float:
            norm = compute()
            if not math.isfinite(norm):
                raise _NonFiniteGradNorm(float(norm))
            return norm

        self.optimizer.get_grad_norm = checked


def _global_loss(reports: list[dict], *, tp: int) -> tuple[float, int]:
    """Mean loss over the global batch, known on every rank.

    Only last-stage ranks hold reports; summing [loss_sum, tokens] over the whole world counts each
    tensor-parallel replica alike, so the ratio is the data-parallel mean and the count is tp times too big.
    Context-parallel ranks hold disjoint tokens of the same sequences: their sums simply add up.
    """
    totals = torch.zeros(2, dtype=torch.float64, device=device())
    for report in reports:
        totals += report["lm"].to(totals)
    dist.all_reduce(totals)
    tokens = int(totals[1]) // tp
    return float(totals[0] / totals[1]), tokens


def global_position_losses(sums: list[torch.Tensor], spec: tuple[int, int], *, tp: int) -> list[PositionBucket]:
    """Per-bucket mean loss over the whole world (collective), from each report's ``position_sums``.

    As in ``_global_loss``: tensor-parallel replicas count alike (tokens / tp), cp and dp ranks simply add up."""
    buckets, width = spec
    totals = torch.zeros(2, buckets, dtype=torch.float64, device=device())
    for part in sums:
        totals += part.to(totals)
    dist.all_reduce(totals)
    means = torch.where(totals[1] > 0, totals[0] / totals[1].clamp(min=1), float("nan"))
    return [PositionBucket(i * width, (i + 1) * width, float(means[i]), int(totals[1, i]) // tp) for i in range(buckets)]
