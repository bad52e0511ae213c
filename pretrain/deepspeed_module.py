"""One optimizer step of Qwen2 under DeepSpeed ZeRO-2/3: the same ``train_batch`` contract as ``TrainModule``.

Same loss (per-token sums over the global batch, divided by the global token count), same AdamW,
parameter groups, gradient clipping and warm-up + cosine schedule, so a ZeRO-2/3 run follows a
megatron-core run of the same job step for step. The Trainer does not know which one it drives.
"""
from __future__ import annotations


import torch
import torch.distributed as dist
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel.deepspeed import apply_deepspeed, build_adamw, gathered_parameters
from parallel.layout import ParallelLayout
from parallel.mesh import device
from pretrain.optim import build_scheduler, fused_adamw
from pretrain.checkpoint import CheckpointState, DeepSpeedState
from pretrain.train_module import BaseTrainModule, PositionBucket, StepResult, global_position_losses, position_sums


class DeepSpeedTrainModule(BaseTrainModule):
    """A DeepSpeed engine over one megatron ``GPTModel`` + LR schedule, and ``train_batch``."""

    def __init__(self, engine, config: TransformerConfig, scheduler: OptimizerParamScheduler, *,
                 layout: ParallelLayout) -> None:
        self.engine = engine
        self.config = config
        self.scheduler = scheduler
        self.layout = layout
        self.zero = layout.zero
        self.dp = layout.dp  # the world: DeepSpeed serves data-parallel layouts only
        self.model = engine.module  # the bare GPTModel (ZeRO-3: its parameters are partitioned)

    def train_batch(self, microbatches: list[dict[str, torch.Tensor]], *, poison: bool = False) -> StepResult:
        """Forward/backward over the microbatches, then one optimizer step unless loss or gradients are not finite."""
        engine, dev = self.engine, device()
        engine.train()
        local_tokens = sum(mb["loss_mask"].sum() for mb in microbatches).to(torch.float64)
        global_tokens = local_tokens.clone()
        dist.all_reduce(global_tokens)
        # DeepSpeed averages gradients over the dp ranks; megatron sums them and divides by the global
        # token count. Scaling each rank's token-sum loss by dp / tokens gives megatron's gradients.
        scale = self.dp / max(float(global_tokens), 1.0)
        if self.config.num_moe_experts:
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale, device=dev))
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i, mb in enumerate(microbatches):
            engine.set_gradient_accumulation_boundary(i == len(microbatches) - 1)
            mb_loss, _ = self._loss_sum(mb)
            if poison:  # testing hook (trainer.inject_nan_steps)
                mb_loss = mb_loss * float("nan")
            backward_loss = mb_loss * scale
            if not torch.isfinite(mb_loss):
                # Make every gradient NaN (NaN * 0 is NaN), so DeepSpeed's own overflow check sees a
                # non-finite norm on every rank and discards the step, even where a masked NaN left
                # the gradients finite.
                backward_loss = backward_loss * float("nan")
            engine.backward(backward_loss, scale_wrt_gas=False)
            loss_sum += mb_loss.detach().to(torch.float64)
        totals = torch.stack([loss_sum, local_tokens.to(dev)])
        dist.all_reduce(totals)
        loss, tokens = float(totals[0] / totals[1]), int(totals[1])
        lr = engine.optimizer.param_groups[0]["lr"]
        self.scheduler.step(increment=1)  # the LR of step s is the schedule at s
        engine.step()  # skips (and clears the gradients) when the global gradient norm is not finite
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not engine.was_step_applied():
            self.scheduler.step(increment=-1)  # the step did not happen: neither does its LR change
            return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens, skipped=True)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=engine.optimizer.param_groups[0]["lr"],
                          tokens=tokens, skipped=False)

    def evaluate_by_position(self, batches, buckets: int) -> tuple[float, int, list[PositionBucket]]:
        """``evaluate`` plus the loss in ``buckets`` equal slices of the sequence positions (``TrainModule``'s)."""
        engine, dev = self.engine, device()
        totals = torch.zeros(2, dtype=torch.float64, device=dev)
        sums, spec = [], None
        engine.eval()
        try:
            with torch.no_grad():
                for microbatches in batches:
                    for mb in microbatches:
                        if buckets and spec is None:
                            spec = (buckets, mb["tokens"].shape[1] // buckets)
                        totals += torch.stack(self._loss_sum(mb, spec, sums)).to(totals)
        finally:
            engine.train()
        dist.all_reduce(totals)
        by_position = global_position_losses(sums, spec, tp=1) if buckets else []
        return float(totals[0] / totals[1]), int(totals[1]), by_position

    def _loss_sum(self, mb: dict[str, torch.Tensor], spec: tuple[int, int] | None = None,
                  position_out: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One microbatch through the engine: (sum of its masked per-token losses, its loss-mask token count);
        with ``spec`` (buckets, width), its ``position_sums`` are appended to ``position_out``."""
        dev = device()
        per_token = self.engine(mb["tokens"].to(dev), mb["position_ids"].to(dev), None, labels=mb["labels"].to(dev))
        mask = mb["loss_mask"].to(dev).reshape(-1).float()
        weighted = per_token.float().reshape(-1) * mask
        if spec is not None:
            position_out.append(position_sums(weighted, mask, mb["position_ids"], *spec))
        return weighted.sum(), mask.sum()

    def checkpoint_state(self) -> CheckpointState:
        return DeepSpeedState(self)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's tensors under GPTModel names, whole on every rank (collective under ZeRO-3)."""
        with gathered_parameters(self.engine):
            return {k: v.detach().clone() for k, v in self.engine.module.state_dict().items() if torch.is_tensor(v)}


def build_deepspeed_train_module(job, layout: ParallelLayout, config: TransformerConfig,
                                 model: torch.nn.Module) -> DeepSpeedTrainModule:
    """parallel.zero in (2, 3): AdamW like megatron's, the DeepSpeed engine, and the same LR schedule."""
    o, t, dp = job.optim, job.trainer, layout.dp
    optimizer = build_adamw(model, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                            fused=fused_adamw(o.fused))
    engine = apply_deepspeed(
        model, zero_stage=layout.zero, optimizer=optimizer, offload_optimizer=layout.offload_optimizer,
        bf16=t.precision == "bf16", clip_grad=o.clip_grad, micro_batch_size=t.micro_batch_size,
        grad_accum_steps=t.global_batch_size // (t.micro_batch_size * dp),
    )
    scheduler = build_scheduler(o, engine.optimizer, total_steps=t.steps)
    return DeepSpeedTrainModule(engine, config, scheduler, layout=layout)
