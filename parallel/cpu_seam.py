"""The one place that makes megatron-core 0.16.1 run without CUDA (CPU + gloo).

``apply_cpu_seam()`` is called by ``parallel.mesh.init_distributed`` right after
``init_process_group`` and before ``initialize_model_parallel``. With CUDA present GPU runs take
megatron-core's own code paths untouched. Without CUDA it patches megatron-core, never torch itself:

1. ``torch`` inside megatron-core modules. megatron-core calls ``torch.cuda.current_device()``,
   ``torch.cuda.synchronize()``, ``torch.cuda.Stream()``/``Event()``, the CUDA RNG functions and
   creates tensors with ``device="cuda"`` in ~200 places. Each ``megatron.core.*`` module's global
   ``torch`` (loaded now or imported later) is rebound to ``_TORCH_ON_CPU``: a copy of the torch
   namespace whose ``cuda`` attribute is ``_CudaOnCpu`` and whose tensor factories map a CUDA
   ``device=`` to the CPU. Code outside megatron-core keeps the real ``torch``.
2. A few megatron-core functions, patched by name (see ``_patch_functions``): the CUDA RNG tracker,
   the MoE split-size helper, ``Tensor.type()`` string checks in the optimizers, ``.cuda()`` calls
   on the paths a trainer takes (tied embeddings with PP, TP batch broadcast, distributed-optimizer
   checkpoint state, RoPE's per-context-parallel-rank slice), and a guard against the gloo
   batched-p2p mismatch of interleaved pipelines.

One fix is not about CUDA and is applied on GPU too: MoE routing raises ``NameError`` without
TransformerEngine (``_define_missing_te_names``).

Megatron-core's ``model_parallel_cuda_manual_seed`` then works on the CPU: the RNG tracker's
"CUDA" states are states of torch's CPU generator, forked in and out exactly as on GPU, and, as on
GPU, it leaves the default CPU generator as the caller seeded it. ``model_parallel_seed`` calls it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import logging
import sys
import types
from typing import Any, Callable

import torch

__all__ = ["apply_cpu_seam", "model_parallel_seed", "cpu_seam_applied"]

log = logging.getLogger(__name__)

_APPLIED = False

# Modules a GPT/MoE training step reaches, imported up front so they are patched before first use.
# Any other megatron.core module imported later is patched by ``_PatchOnImport``.
_EAGER_MODULES = (
    "megatron.core.tensor_parallel",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
)


# --------------------------------------------------------------------------------------------------
# 1. What megatron-core sees as ``torch``
# --------------------------------------------------------------------------------------------------
def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a CUDA device


def _device_on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``factory(..., device="cuda")`` -> ``factory(..., device="cpu")``."""

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


class _NullEvent:
    """``torch.cuda.Event`` on one in-order CPU stream: everything has already happened."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """``torch.cuda.Stream`` on the CPU: one in-order stream, so waits and records are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _NullStream()


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as megatron-core code sees it on a CPU-only machine.

    Each member names what breaks without it; everything else (``is_available()`` -> False,
    ``FloatTensor``, ``nvtx``, ``amp``...) is the real ``torch.cuda``.
    """

    def __init__(self):
        super().__init__("torch.cuda")
        # rotary embedding, ColumnParallelLinear, gather/scatter, router, DDP buffers...:
        # ``device=torch.cuda.current_device()`` raises "Torch not compiled with CUDA enabled".
        self.current_device = lambda: "cpu"
        # pipeline p2p after batched isend/irecv, parallel_state barriers, DDP free/alloc.
        self.synchronize = lambda device=None: None
        # alltoall token dispatcher's device-to-host stream, DDP/shared-expert overlap streams.
        self.Stream = _NullStream
        self.Event = _NullEvent
        self.ExternalStream = _NullStream
        self.stream = lambda stream=None: contextlib.nullcontext()
        self.current_stream = lambda device=None: _CPU_STREAM
        self.default_stream = lambda device=None: _CPU_STREAM
        self.set_stream = lambda stream: None
        # CUDA RNG tracker (``CudaRNGStatesTracker.add``, ``model_parallel_cuda_manual_seed``):
        # the CPU generator stands in for the CUDA one.
        self.get_rng_state = lambda device="cuda": torch.get_rng_state()
        self.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.manual_seed_all = lambda seed: torch.manual_seed(seed)
        # ``model_parallel_cuda_manual_seed``'s own seeding of the default CUDA generator (see
        # ``_patch_functions``): on the CPU that generator is torch's, which the caller seeded.
        self.keep_default_generator = lambda seed: None
        self.random = types.SimpleNamespace(get_rng_state=self.get_rng_state,
                                            set_rng_state=self.set_rng_state,
                                            manual_seed=self.manual_seed)

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


def _torch_on_cpu() -> types.ModuleType:
    ns = types.ModuleType("torch")
    ns.__dict__.update(torch.__dict__)  # plain dict lookups: no per-access overhead
    ns.__getattr__ = lambda name: getattr(torch, name)  # attributes torch creates lazily later
    ns.cuda = _CudaOnCpu()
    # causal mask (transformer/utils.py), schedules' token count, optimizer found_inf/scale,
    # grad clipping norms, DDP warm-up buffer, MoE loss tracker: ``device="cuda"`` literals.
    for name in ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
                 "randint", "randperm", "linspace", "eye", "empty_strided"):
        setattr(ns, name, _device_on_cpu(getattr(torch, name)))
    return ns


_TORCH_ON_CPU: types.ModuleType | None = None


def _rebind_torch(module: types.ModuleType) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = _TORCH_ON_CPU


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Rebinds ``torch`` in megatron.core modules imported after the seam was applied."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_rebind(module):
            exec_module(module)
            _rebind_torch(module)

        loader.exec_module = exec_and_rebind  # this loader instance belongs to this module alone
        return spec


# --------------------------------------------------------------------------------------------------
# 2. Function-level patches
# --------------------------------------------------------------------------------------------------
def _rewrite_code(func: Callable, *, consts: dict | None = None, names: dict | None = None) -> None:
    """Replace string constants / attribute names in ``func``'s code (nested code objects included).

    Each replacement must be found at least once, so a megatron-core release that changed the function
    fails here instead of running unpatched.
    """
    consts, names = consts or {}, names or {}
    found: set[str] = set()

    def fix_const(c):
        if isinstance(c, str) and c in consts:
            found.add(c)
            return consts[c]
        if isinstance(c, tuple):
            return tuple(fix_const(x) for x in c)
        if isinstance(c, frozenset):
            return frozenset(fix_const(x) for x in c)
        if isinstance(c, types.CodeType):
            return fix_code(c)
        return c

    def fix_name(n):
        if n in names:
            found.add(n)
            return names[n]
        return n

    def fix_code(code: types.CodeType) -> types.CodeType:
        return code.replace(co_consts=tuple(fix_const(c) for c in code.co_consts),
                            co_names=tuple(fix_name(n) for n in code.co_names))

    func = getattr(func, "__func__", func)
    new_code = fix_code(func.__code__)
    missing = (set(consts) | set(names)) - found
    if missing:
        raise RuntimeError(f"cpu_seam: {func.__module__}.{func.__qualname__} no longer contains "
                           f"{sorted(missing)}; re-check the seam for this megatron-core version")
    func.__code__ = new_code  # in place: every alias (``from x import f``) sees the patch


# ``param.type()`` is 'torch.FloatTensor' on the CPU, never 'torch.cuda.FloatTensor'.
_CPU_TYPE_NAMES = {f"torch.cuda.{t}Tensor": f"torch.{t}Tensor" for t in ("Float", "Half", "BFloat16")}


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    # On GPU this turns split sizes into numpy arrays; on the CPU megatron leaves them tensors
    # (``tensor.is_cuda`` is False), and ``all_to_all_single`` then gets tensor split sizes.
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    # rope_utils.get_pos_emb_on_this_cp_rank with its index built where ``pos_emb`` lives: the original
    # pins host memory and calls ``.cuda()``, both of which raise without CUDA. Same chunks: r, 2cp-1-r.
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def _rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _DropCpuRngWarning(logging.Filter):
    # The tracker warns when the CPU RNG changes inside a "GPU RNG" fork; on the CPU that generator
    # is the forked one, so the warning would fire on every initialisation and dropout.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _guard_batched_p2p(batched: Callable) -> Callable:
    @functools.wraps(batched)
    def wrapper(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, group,
                prev_pipeline_rank, next_pipeline_rank):
        # gloo matches messages between two ranks in posting order with one tag: when the previous
        # and next stage are the same rank (pp=2) and one batch both sends (or receives) in both
        # directions, the activations and gradients are swapped. Interleaved schedules do that.
        if prev_pipeline_rank == next_pipeline_rank and (
                (tensor_send_prev is not None and tensor_send_next is not None)
                or (tensor_recv_prev is not None and tensor_recv_next is not None)):
            raise RuntimeError(
                "batched p2p with the previous and next pipeline stage on the same rank silently "
                "swaps messages on gloo; set TransformerConfig(batch_p2p_comm=False) on CPU")
        return batched(tensor_send_prev=tensor_send_prev, tensor_recv_prev=tensor_recv_prev,
                       tensor_send_next=tensor_send_next, tensor_recv_next=tensor_recv_next,
                       group=group, prev_pipeline_rank=prev_pipeline_rank,
                       next_pipeline_rank=next_pipeline_rank)

    return wrapper


def _replace_everywhere(original: Callable, replacement: Callable) -> None:
    """Point every loaded megatron.core module's reference to ``original`` at ``replacement``."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and mod is not None:
            for attr, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, attr, replacement)


def _patch_functions() -> None:
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding  # noqa: F401
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import data as tp_data
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    # RNG tracker fork/restore calls torch.cuda.random.get_rng_state / default_generators[...].
    tp_random._get_cuda_rng_state = _rng_state
    tp_random._set_cuda_rng_state = _set_rng_state
    logging.getLogger(tp_random.__name__).addFilter(_DropCpuRngWarning())
    # model_parallel_cuda_manual_seed(seed) also reseeds the default CUDA generator with ``seed``.
    # On GPU that leaves torch's CPU generator alone; on the CPU it would overwrite the caller's
    # ``torch.manual_seed`` (Megatron-LM: seed + 100 * pp_rank), so that one call becomes a no-op.
    # The tracker's own states are still seeded (``CudaRNGStatesTracker.add`` is not rewritten).
    _rewrite_code(tp_random.model_parallel_cuda_manual_seed, names={"manual_seed": "keep_default_generator"})

    # Context parallel: RoPE keeps this cp rank's 2 chunks of the frequencies (pinned memory + .cuda()).
    _replace_everywhere(rope_utils.get_pos_emb_on_this_cp_rank, _pos_emb_on_this_cp_rank)

    # alltoall dispatcher: split sizes must become numpy (see ``_maybe_move_tensor_to_cpu``).
    _replace_everywhere(moe_utils.maybe_move_tensor_to_cpu, _maybe_move_tensor_to_cpu)

    # DistributedOptimizer/Float16Optimizer sort params by ``param.type()`` against CUDA type names
    # ("Wrapped parameters must be one of torch.cuda.FloatTensor..."); grad clipping asserts one.
    dopt = distrib_optimizer.DistributedOptimizer
    _rewrite_code(dopt.__init__, consts={"torch.cuda.HalfTensor": "torch.HalfTensor",
                                         "torch.cuda.BFloat16Tensor": "torch.BFloat16Tensor"})
    _rewrite_code(dopt._build_model_and_main_param_groups, consts=_CPU_TYPE_NAMES)
    _rewrite_code(optimizer.Float16OptimizerWithFloat16Params.__init__, consts=_CPU_TYPE_NAMES)
    _rewrite_code(clip_grads.clip_grad_by_total_norm_fp32,
                  consts={"torch.cuda.FloatTensor": "torch.FloatTensor"})

    # ``.cuda()`` raises without CUDA (``torch.cuda.X`` in these functions becomes ``torch.cpu.X``,
    # which exists too): tied embeddings across pipeline stages (all-reduce of the first/last stage
    # copies), tensor_parallel.broadcast_data (batch broadcast over TP), and the distributed
    # optimizer's state gather behind ``sharded_state_dict`` with the "fully_reshardable" format.
    _rewrite_code(language_module.LanguageModule.setup_embeddings_and_output_layer,
                  names={"cuda": "cpu"})
    _rewrite_code(tp_data.broadcast_data, names={"cuda": "cpu"})
    _rewrite_code(dopt.get_parameter_state_dp_zero, names={"cuda": "cpu"})

    # Interleaved pipeline + gloo: refuse the silently wrong batched p2p (see ``_guard_batched_p2p``).
    p2p_communication._batched_p2p_ops = _guard_batched_p2p(p2p_communication._batched_p2p_ops)


def _define_missing_te_names() -> None:
    """Not a CUDA issue, so also applied with CUDA: the GPU machine has no TransformerEngine either."""
    from megatron.core.transformer.moe import moe_utils

    # MoE router (every MoE forward): ``te_general_gemm`` is only bound when TransformerEngine
    # imports, and ``RouterGatingLinearFunction.forward`` tests it -> NameError. None selects
    # megatron-core's own torch.mm fallback, exactly what its ``extensions`` module binds without TE.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# --------------------------------------------------------------------------------------------------
def apply_cpu_seam() -> None:
    """Make megatron-core 0.16.1 run on the CPU. Idempotent.

    With CUDA it only binds the TransformerEngine name missing without TE (``_define_missing_te_names``)
    and leaves every megatron-core code path as it is. Call it after
    ``torch.distributed.init_process_group`` and before ``parallel_state.initialize_model_parallel``
    and model construction.
    """
    global _APPLIED, _TORCH_ON_CPU
    _define_missing_te_names()
    if _APPLIED or torch.cuda.is_available():
        return
    for name in _EAGER_MODULES:
        importlib.import_module(name)
    _TORCH_ON_CPU = _torch_on_cpu()
    for name, mod in list(sys.modules.items()):
        if name == "megatron.core" or name.startswith("megatron.core."):
            _rebind_torch(mod)
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    _patch_functions()
    _APPLIED = True
    log.debug("cpu_seam: megatron-core patched for CPU")


def cpu_seam_applied() -> bool:
    return _APPLIED


def model_parallel_seed(seed: int, **kwargs: Any) -> None:
    """``tensor_parallel.model_parallel_cuda_manual_seed(seed, **kwargs)`` on GPU and CPU alike.

    Seeds megatron's RNG tracker: the model-parallel stream (``seed + 2718 + tp_rank``: TP-sharded
    weight init, dropout inside TP regions), the expert stream and the data-parallel one. On the CPU
    (the seam is applied here if needed) megatron-core's own function runs, with its tracker states
    held by torch's CPU generator; as on GPU, torch's default generator stays as the caller seeded it.
    Call it after ``initialize_model_parallel``. Pass a per-pipeline-stage seed (Megatron-LM:
    ``seed + 100 * pp_rank``): the tracker seed does not depend on the stage, so with one seed every
    stage's TP-sharded weights start from the same random stream.
    """
    apply_cpu_seam()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed, **kwargs)
