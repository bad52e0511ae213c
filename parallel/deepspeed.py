"""ZeRO-2/3 data parallelism through DeepSpeed, for layouts with tp = pp = ep = 1.

megatron-core's distributed optimizer covers ZeRO-1 (``parallel/data.py``); ZeRO-2 (gradients sharded
too) and ZeRO-3 (parameters sharded too) come from DeepSpeed, wrapping the same megatron ``GPTModel``.
``ParallelConfig`` refuses zero 2/3 with tensor, pipeline or expert parallelism before any process
starts, so the engine's data-parallel group is the whole world.

The optimizer is a client ``torch.optim.AdamW`` built here with megatron's parameter groups (no weight
decay on biases and 1-D tensors, ``wd_mult`` for ``OptimizerParamScheduler``): DeepSpeed's fused
CPU/GPU Adam ops are not prebuilt and their JIT build takes minutes. DeepSpeed keeps fp32 master
partitions (also for bf16 models), clips the global gradient norm, and reduces gradients in fp32.

Installing: ``DS_BUILD_OPS=0 pip install deepspeed==0.19.8`` (pure Python; no op is compiled).
"""
from __future__ import annotations

import contextlib
import importlib
import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _import_deepspeed():
    """Import DeepSpeed with its shared-memory collective op switched off.

    ``deepspeed.comm`` JIT-compiles a C++ op (``deepspeed_shm_comm``) with g++/ninja the first time a
    CPU backend starts (~2 min, and a build killed midway leaves a lock file that blocks every later
    one). It only speeds up intra-node CPU all-reduce; gloo does the same job here.
    """
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "parallel.zero=2/3 needs DeepSpeed: DS_BUILD_OPS=0 pip install deepspeed==0.19.8") from e
    comm_torch = importlib.import_module("deepspeed.comm.torch")  # `import deepspeed.comm.torch as m` gives torch
    comm_torch.build_shm_op = lambda: None
    return deepspeed


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """megatron-core's rule (``get_standard_config_overrides``): biases and 1-D tensors (norms) get none."""
    return name.endswith(".bias") or param.ndim == 1


def adamw_param_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups, with/without weight decay; ``wd_mult`` lets ``OptimizerParamScheduler`` set each one's decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [g for g in ({"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}) if g["params"]]


def build_adamw(model: torch.nn.Module, *, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """The client optimizer DeepSpeed wraps: torch AdamW (decoupled weight decay), as megatron-core uses on CPU;
    ``fused``: torch's fused kernel (DeepSpeed steps it on the fp32 partitions, on their device)."""
    return torch.optim.AdamW(adamw_param_groups(model), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             **({"fused": True} if fused else {}))


def deepspeed_config(*, zero_stage: int, offload_optimizer: bool, bf16: bool, clip_grad: float,
                     micro_batch_size: int, grad_accum_steps: int, dp: int,
                     param_persistence_threshold: int, bucket_size: int) -> dict:
    """The engine's JSON config: ZeRO stage, precision, clipping and batch geometry (checked by DeepSpeed)."""
    zero: dict = {
        "stage": zero_stage,
        # Gradient reduction / parameter gather buckets, in elements (the bucket buffers are allocated whole).
        "reduce_bucket_size": bucket_size,
        "allgather_bucket_size": bucket_size,
        "contiguous_gradients": True,
        "overlap_comm": False,  # no CUDA streams to overlap on; keeps the reduction order deterministic
        "reduce_scatter": True,
    }
    if zero_stage == 3:
        # Parameters smaller than this stay whole on every rank (DeepSpeed's default is 1e5 elements).
        zero["stage3_param_persistence_threshold"] = param_persistence_threshold
        zero["stage3_prefetch_bucket_size"] = bucket_size
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * dp,
        "gradient_clipping": clip_grad,
        "zero_optimization": zero,
        # bf16 weights/activations, fp32 master partitions; skip a step whose gradient norm is not finite.
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "communication_data_type": "fp32",  # reduce gradients in fp32 whatever the model dtype
        "data_types": {"grad_accum_dtype": "fp32"} if bf16 else {},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ... also with ZeRO-Offload (DeepSpeedCPUAdam needs a JIT build)
        "steps_per_print": 2**31 - 1,  # the trainer's callbacks log
        "wall_clock_breakdown": False,
    }


def apply_deepspeed(
    model: torch.nn.Module,
    *,
    zero_stage: int,
    optimizer: torch.optim.Optimizer,
    offload_optimizer: bool = False,
    bf16: bool = False,
    clip_grad: float = 1.0,
    micro_batch_size: int,
    grad_accum_steps: int,
    bucket_size: int | None = None,
):
    """Wrap a (tp = pp = 1) megatron ``GPTModel`` and its client optimizer in a DeepSpeed ZeRO engine.

    Every rank must hold the same initial weights (DeepSpeed broadcasts rank 0's module at start-up
    anyway). Returns the ``DeepSpeedEngine``; ``engine.optimizer.param_groups`` are the ones to schedule.
    ``bucket_size``: elements per gradient-reduction / gather bucket; default DeepSpeed's 5e8, capped at
    the model's size (the bucket buffers are allocated whole: 2 GB in fp32 at the default).
    """
    if zero_stage not in (2, 3):
        raise ValueError(f"apply_deepspeed serves ZeRO stages 2 and 3, got {zero_stage}")
    deepspeed = _import_deepspeed()
    dp = dist.get_world_size()
    # ZeRO-3: keep 1-D tensors (norms, biases) whole and partition every matrix. DeepSpeed's absolute
    # default (1e5 elements) would keep a small model entirely unpartitioned.
    threshold = max((p.numel() for p in model.parameters() if p.ndim == 1), default=0)
    if bucket_size is None:
        bucket_size = min(500_000_000, sum(p.numel() for p in model.parameters()))
    config = deepspeed_config(zero_stage=zero_stage, offload_optimizer=offload_optimizer, bf16=bf16,
                              clip_grad=clip_grad, micro_batch_size=micro_batch_size,
                              grad_accum_steps=grad_accum_steps, dp=dp, param_persistence_threshold=threshold,
                              bucket_size=bucket_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    if zero_stage == 3 and getattr(model, "share_embeddings_and_output_weights", False):
        # The output layer reads the embedding's (partitioned) weight: gather it for the whole forward.
        deepspeed.zero.register_external_parameter(model, model.shared_embedding_or_output_weight())
    if dist.get_rank() == 0:
        log.info("DeepSpeed ZeRO-%d over dp=%d (world)%s%s", zero_stage, dp, ", bf16" if bf16 else "",
                 ", optimizer offloaded to CPU" if offload_optimizer else "")
    return engine


def _checkpoint_types() -> list[type]:
    """The non-tensor classes DeepSpeed 0.19.8 pickles into its checkpoint files (measured for ZeRO-2/3,
    fp32/bf16, with and without optimizer offload): the stage enum, the optimizer's static loss scaler,
    and the fragment addresses of its parameter mapping."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Within it, ``torch.load`` unpickles only tensors, plain containers and DeepSpeed's checkpoint types.

    DeepSpeed's readers (``engine.load_checkpoint``, ``zero_to_fp32``) pass ``weights_only=False``, which
    lets a tampered checkpoint run code; the project loads nothing that way. Not thread-safe: it swaps
    ``torch.load`` for the duration (DeepSpeed looks it up at each call).
    """
    _import_deepspeed()
    allowed, real_load = _checkpoint_types(), torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real_load(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


def gathered_parameters(engine):
    """Context manager: within it, every ZeRO-3 parameter of ``engine.module`` is whole on every rank
    (a no-op context for ZeRO-2, whose parameters are always whole)."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    deepspeed = _import_deepspeed()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
