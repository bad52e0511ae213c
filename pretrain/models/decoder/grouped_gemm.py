"""``trainer.moe_grouped_gemm``: megatron-core's ``GroupedMLP`` without the ``grouped_gemm`` package.

megatron-core 0.16.1 runs its experts either as ``SequentialMLP`` (a Python loop: two GEMMs per expert per
layer, 60 experts in Qwen1.5-MoE) or as ``GroupedMLP`` / ``TEGroupedMLP``, which need the ``grouped_gemm``
CUDA package or TransformerEngine; neither is on the GPU machine. ``GroupedMLP`` calls one function,
``grouped_gemm.ops.gmm(x, w, tokens_per_expert, trans_b=False)``; this module provides it on
``torch._grouped_mm`` (one kernel for all experts; CUDA Hopper bf16 kernels, a CPU implementation too) and
installs it where megatron-core looks for the package. ``GroupedMLP`` holds each projection's experts in one
weight (``weight1`` [hidden, experts x 2 x ffn], ``weight2`` [experts x ffn, hidden]) and keeps
``SequentialMLP``-compatible names in its distributed checkpoint.
"""
from __future__ import annotations

import types

import torch


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: ``_grouped_mm``'s backward refuses the
    stride-0 gradient that e.g. ``sum()`` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """Rows ``a[offset_e : offset_e + batch_sizes[e]] @ b[e]`` for every expert ``e``, concatenated.

    ``a`` [tokens, k] (tokens sorted by expert), ``b`` [experts, k, n] (or [experts, n, k] with ``trans_b``),
    ``batch_sizes`` [experts] tokens per expert (host or device). The grouped_gemm package's contract.
    """
    if trans_b:
        b = b.transpose(1, 2)
    if any(d * a.element_size() % 16 for d in b.shape[1:]):  # _grouped_mm needs 16-byte aligned rows
        return gmm_loop(a, b, batch_sizes)
    # (megatron may hand the sizes over as a host tensor or, on the CPU seam, a numpy array)
    offsets = torch.cumsum(torch.as_tensor(batch_sizes).to(device=a.device), 0).to(torch.int32)
    return _ContiguousGrad.apply(torch._grouped_mm(a, b, offs=offsets))


def gmm_loop(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """The same product as :func:`gmm`, one GEMM per expert (the reference the tests compare against)."""
    if trans_b:
        b = b.transpose(1, 2)
    parts = torch.split(a, [int(n) for n in torch.as_tensor(batch_sizes).tolist()])
    return torch.cat([part @ b[e] for e, part in enumerate(parts)])


def install() -> None:
    """Point megatron-core's ``grouped_gemm_util`` at :func:`gmm` (before any GroupedMLP is built)."""
    from megatron.core.transformer.moe import grouped_gemm_util

    if not hasattr(torch, "_grouped_mm"):
        from common.errors import ConfigError

        raise ConfigError(f"trainer.moe_grouped_gemm=true: this torch ({torch.__version__}) has no torch._grouped_mm")
    if grouped_gemm_util.grouped_gemm is None:
        package = types.SimpleNamespace(ops=types.SimpleNamespace(gmm=gmm))
        grouped_gemm_util.grouped_gemm = package
        grouped_gemm_util.ops = package.ops
