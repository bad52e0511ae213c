"""AdamW with fp32 master weights (megatron-core optimizer) and the warm-up + cosine schedule."""
from __future__ import annotations

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from pretrain.config import OptimConfig


def build_optimizer(
    optim: OptimConfig, chunks: list[torch.nn.Module], *, bf16: bool, zero: int, total_steps: int
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    config = OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: torch AdamW underneath
        lr=optim.lr,
        min_lr=optim.lr * optim.min_lr_ratio,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=zero == 1,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    return optimizer, build_scheduler(optim, optimizer, total_steps=total_steps)


def build_scheduler(optim: OptimConfig, optimizer, *, total_steps: int) -> OptimizerParamScheduler:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak; constant weight decay."""
    decay_steps = optim.decay_steps or total_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.lr * optim.min_lr_ratio,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(decay_steps, optim.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
    )
