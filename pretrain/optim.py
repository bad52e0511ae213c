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
    set_adamw_kernel(optimizer, fused_adamw(optim.fused))
    set_grad_norm_kernel(optim.foreach_grad_norm)
    return optimizer, build_scheduler(optim, optimizer, total_steps=total_steps)


def fused_adamw(fused: bool | None) -> bool:
    """``optim.fused``: None = auto (the fused kernel on CUDA; torch's for-loop default on CPU)."""
    return torch.cuda.is_available() if fused is None else fused


def set_adamw_kernel(optimizer, fused: bool) -> None:
    """Select torch AdamW's fused kernel in the torch optimizers megatron-core built.

    megatron-core 0.16.1 without TransformerEngine/apex instantiates ``torch.optim.AdamW`` with torch's
    defaults and has no switch. torch reads ``fused``/``foreach`` from each param group at every ``step()``
    (its step counters too are created per group setting), so setting them before the first step is the
    same as constructing with ``fused=True``. The parameters are always fp32 master weights here.
    """
    if not fused:
        return
    for megatron_opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        torch_opt = megatron_opt.optimizer
        if torch_opt is None:  # a rank with no parameters in this group
            continue
        torch_opt.defaults.update(fused=True, foreach=None)
        for group in torch_opt.param_groups:
            group.update(fused=True, foreach=None)
        torch_opt._step_supports_amp_scaling = True  # as AdamW(fused=True).__init__ sets


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for apex's ``amp_C.multi_tensor_l2norm``: the L2 norm of all tensors, left on the device.

    megatron-core's fallback without apex (``local_multi_tensor_l2_norm``) builds ``torch.tensor(l2)`` from
    a list of per-tensor 0-d device norms: one device-to-host copy per gradient tensor (~340 per step for
    Qwen2-1.5B), each waiting for the GPU. Here: ``torch._foreach_norm`` (a few multi-tensor kernels) and one
    reduction; the caller's ``.item()`` on the all-reduced total is the step's only sync for the norm.
    """
    (tensors,) = tensor_lists
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for apex's ``amp_C.multi_tensor_scale`` (dst = src * scale) in foreach kernels (clipping)."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def set_grad_norm_kernel(foreach: bool) -> None:
    """``optim.foreach_grad_norm``: megatron-core's grad-norm and clipping helpers on foreach kernels (true) or its
    own fallback (false). Only replaces the fallback: where apex's fused kernels were found they stay."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    originals = getattr(clip_grads, "_qwen_originals", None)
    if originals is None:
        originals = clip_grads._qwen_originals = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl)
    if originals[0] is not local_multi_tensor_l2_norm or originals[1] is not local_multi_tensor_scale:
        return  # apex's amp_C kernels: already fused
    clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl = (
        (_foreach_l2_norm, _foreach_scale) if foreach else originals)


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
