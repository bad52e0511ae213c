"""Router statistics of Qwen2-MoE training: load-balancing loss and tokens per expert, per step."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.transformer.moe.router import TopKRouter

from parallel.mesh import device


class MoEStats:
    """Counts the tokens each router sends to each expert (forward hooks), and reads megatron-core's
    per-layer auxiliary-loss tracker. ``collect()`` is collective: every rank calls it once per step."""

    def __init__(self, chunks: list, num_layers: int, num_experts: int, *, tp: int, sequence_parallel: bool) -> None:
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device())
        # megatron-core's tracker is a process global: start from zero, not from what an earlier model in
        # this process left (e.g. a DeepSpeed MoE run, which never collects).
        clear_aux_losses_tracker()
        # Without sequence parallelism every tensor-parallel rank routes the same tokens.
        self.tp_copies = 1 if sequence_parallel else tp
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router: TopKRouter, _inputs, outputs) -> None:
        if torch.is_grad_enabled():  # not in activation recompute or evaluation
            _probs, routing_map = outputs
            self.counts[router.layer_number - 1] += routing_map.sum(dim=0).to(self.counts)

    def collect(self, num_microbatches: int) -> dict:
        counts = self.counts.clone()
        self.counts.zero_()
        # Layers live on different pipeline stages, tokens on different data-parallel ranks: sum the world.
        dist.all_reduce(counts)
        counts /= self.tp_copies
        per_expert = counts.sum(dim=0)
        metrics = {
            "moe/expert_tokens": per_expert.tolist(),
            "moe/load_imbalance": float(per_expert.max() / per_expert.mean().clamp(min=1e-9)),
        }
        tracker = get_moe_layer_wise_logging_tracker()
        if tracker:
            reduce_aux_losses_tracker_across_ranks()
            for name, entry in tracker.items():
                # Summed over the step's microbatches per layer: report the per-microbatch layer mean
                # (1.0 is perfectly balanced for megatron-core's load-balancing loss, before its coefficient).
                metrics[f"moe/{name}"] = float(entry["values"].mean()) / num_microbatches
            clear_aux_losses_tracker()
        return metrics
