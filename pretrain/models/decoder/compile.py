"""``trainer.compile``: torch.compile each transformer layer of the model chunks in place (as torchtitan does)."""
from __future__ import annotations

import logging
import types
import warnings

import torch

log = logging.getLogger("pretrain")


def apply_compile(chunks: list[torch.nn.Module], *, moe: bool) -> str:
    """Compile every transformer layer of ``chunks`` (bare ``GPTModel``s) as :func:`compile_layers` says;
    returns the scope, for logs."""
    _skip_megatron_warnings_when_compiling()
    layers = [layer for chunk in chunks for layer in chunk.decoder.layers]
    scope = compile_layers(layers, moe=moe, attention="self_attention")
    log.info("torch.compile: %s", scope)
    return scope


def compile_layers(layers: list[torch.nn.Module], *, moe: bool, attention: str) -> str:
    """``torch.compile`` each decoder layer in place (MoE: only its attention block, the attribute named
    ``attention``); returns the scope. Any decoder with this shape of layer takes it: ours, or transformers'
    (``attention="self_attn"``: the benchmarks give their peer the same scope).

    MoE: megatron-core's token dispatch is data-dependent (tokens per expert: ``.item()``, ``masked_select``),
    which breaks the graph and recompiles on every step. Every layer is a new ``self`` for the same code, and
    train/eval mode is guarded on too, so the recompile limit is raised above 2 x layers: otherwise layers
    past the limit silently run eager. Compilation itself is lazy (first forward).
    """
    import torch._dynamo.config as dynamo_config

    limit = max(dynamo_config.recompile_limit, 2 * len(layers) + 8)
    dynamo_config.recompile_limit = dynamo_config.cache_size_limit = limit
    for layer in layers:
        (getattr(layer, attention) if moe else layer).compile()
    return f"{len(layers)} x {'attention block' if moe else 'transformer layer'}"


def _skip_megatron_warnings_when_compiling() -> None:
    """megatron-core 0.16.1's ``RowParallelLinear.forward`` passes no ``tp_group`` on, so every call runs
    ``warnings.warn(..., DeprecationWarning)`` in ``megatron.core.utils`` (on rank 0): a builtin dynamo cannot
    trace, i.e. a graph break in every layer (dynamo cannot reorder it either: its args are not tensors or
    strings). ``megatron.core.utils`` gets a ``warnings`` whose ``warn`` does nothing inside compiled code
    (the warning is shown once anyway, by the eager first call or never)."""
    import megatron.core.utils as mcore_utils

    if getattr(mcore_utils.warnings, "_skips_when_compiling", False):
        return

    def warn(*args, **kwargs):
        if torch.compiler.is_compiling():
            return None
        return warnings.warn(*args, **kwargs)

    shim = types.ModuleType("warnings")
    shim.__dict__.update(warnings.__dict__)
    shim.warn, shim._skips_when_compiling = warn, True
    mcore_utils.warnings = shim
