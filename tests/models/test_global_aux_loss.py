"""The Qwen3-MoE load-balancing loss (``model.moe_load_balancing``) against a reference computed here by hand.

One 2-rank data-parallel job trains the tiny Qwen3-MoE through the real ``TrainModule`` (megatron DDP,
per-token loss, finalize_model_grads) for one step of 2 micro-batches per rank, three times: without the
load-balancing loss, with it per micro-batch, and with it over the global batch. Hooks record each router's
input (its hidden states) and the last layer's router-weight gradient after finalize_model_grads. In the
parent the loss is recomputed from those hidden states and the router weights:

* micro_batch: per rank r and micro-batch m, ``aux = coeff * E / (k T^2) * sum_e P_e count_e`` with P the
  summed router probabilities and counts of that micro-batch's T tokens, averaged over ranks and micro-batches;
* global_batch: the same with P and counts over both ranks' micro-batch m (2T tokens) and the counts averaged
  over the step's micro-batches 1..m so far (megatron's ``global_aux_loss`` accumulates them until
  finalize_model_grads resets it), averaged over micro-batches.

The gradient megatron adds (last layer's router weight, with minus without the loss) must equal autograd's of
that reference, and the logged value (``moe/*load_balancing_loss``) its value over the coefficient.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parallel.testing import run_distributed
from qwen2_tiny_hf import VOCAB, build_tiny_hf

DP, M, B, S = 2, 2, 2, 32  # ranks, micro-batches per rank, micro-batch size, sequence length
COEFF = 0.5  # large, so the loss's gradient stands well above fp32 noise on the language-model gradient
SCOPES = ("none", "micro_batch", "global_batch")


def _microbatches(rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(M):
        tokens = torch.randint(0, VOCAB, (B, S), generator=g)
        out.append(dict(tokens=tokens, labels=torch.roll(tokens, -1, dims=1), loss_mask=torch.ones(B, S),
                        position_ids=torch.arange(S).unsqueeze(0).expand(B, S)))
    return out


def run_scopes(rank: int, world_size: int, hf_dir: str) -> dict:
    import dataclasses

    from parallel.config import ParallelConfig
    from parallel.mesh import init_distributed
    from pretrain.build import build_train_module
    from pretrain.config import DataConfig, JobConfig, OptimConfig, TrainerConfig
    from pretrain.models.hf import HFCheckpoint, model_config_from_hf, unwrap_chunk

    parallel = ParallelConfig(zero=0)  # plain DDP: every rank holds the whole all-reduced gradient
    init_distributed(parallel, seed=0)
    base = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dir).config), vocab_size=VOCAB, init_from=hf_dir)
    results = {}
    for scope in SCOPES:
        model = dataclasses.replace(base, moe_load_balancing="micro_batch" if scope == "none" else scope,
                                    moe_aux_loss_coeff=0.0 if scope == "none" else COEFF)
        job = JobConfig(model=model, parallel=parallel, data=DataConfig(seq_len=S), optim=OptimConfig(clip_grad=0.0),
                        trainer=TrainerConfig(micro_batch_size=B, global_batch_size=B * M * DP))
        module = build_train_module(job, VOCAB)
        layers = unwrap_chunk(module.chunks[0]).decoder.layers
        inputs: list = [[] for _ in layers]
        for i, layer in enumerate(layers):
            layer.mlp.router.register_forward_pre_hook(
                lambda _m, args, i=i: inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone()))
        router = layers[-1].mlp.router
        grads = {}
        finalize = module.config.finalize_model_grads_func

        def finalize_and_record(*args, **kwargs):
            finalize(*args, **kwargs)
            grads["router"] = router.weight.main_grad.detach().clone()

        module.config.finalize_model_grads_func = finalize_and_record
        step = module.train_batch(_microbatches(rank))
        results[scope] = dict(inputs=inputs, grad=grads["router"], extras=step.extras, loss=step.loss)
    return results


def _probs_counts(x: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed router probabilities per expert (differentiable) and tokens routed to each expert."""
    probs = F.softmax(x.double() @ weight.T, dim=-1)
    chosen = torch.topk(probs, k).indices.reshape(-1)
    counts = torch.zeros(probs.shape[-1], dtype=probs.dtype).scatter_add_(0, chosen, torch.ones_like(chosen, dtype=probs.dtype))
    return probs.sum(0), counts


def reference(scope: str, inputs: list, weight: torch.Tensor, E: int, k: int) -> torch.Tensor:
    """The load-balancing loss of one layer. ``inputs[r][m]``: router input [T, H] of rank r, micro-batch m."""
    T = inputs[0][0].shape[0]
    if scope == "micro_batch":
        terms = [E / (k * T * T) * (p * c).sum() for r in range(DP) for p, c in
                 (_probs_counts(inputs[r][m], weight, k) for m in range(M))]
        return COEFF * sum(terms) / (DP * M)
    seen = torch.zeros(E, dtype=torch.float64)
    terms = []
    for m in range(M):
        p, c = _probs_counts(torch.cat([inputs[r][m] for r in range(DP)]), weight, k)
        seen = seen + c
        terms.append(E / (k * (DP * T) ** 2) * (p * seen / (m + 1)).sum())
    return COEFF * sum(terms) / M


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    hf_dir = tmp_path_factory.mktemp("hf") / "qwen3_moe"
    hf = build_tiny_hf("qwen3_moe", seed=7)
    hf.save_pretrained(hf_dir)
    ranks = run_distributed(run_scopes, DP, str(hf_dir), timeout=400)
    weights = [layer.mlp.gate.weight.detach().double() for layer in hf.model.layers]
    return dict(ranks=ranks, weights=weights, E=hf.config.num_experts, k=hf.config.num_experts_per_tok)


def _inputs(ranks, scope: str, layer: int) -> list:
    return [ranks[r][scope]["inputs"][layer] for r in range(DP)]


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_gradient_equals_hand_computed_loss(measured, scope):
    ranks, E, k = measured["ranks"], measured["E"], measured["k"]
    for r in range(DP):  # the gradient is all-reduced: the same on every rank; forward unchanged by the loss
        assert torch.equal(ranks[r][scope]["grad"], ranks[0][scope]["grad"])
        assert ranks[r][scope]["loss"] == ranks[r]["none"]["loss"]
    assert all(len(x) == M for x in _inputs(ranks, scope, -1))
    weight = measured["weights"][-1].clone().requires_grad_(True)
    reference(scope, _inputs(ranks, scope, -1), weight, E, k).backward()
    added = (ranks[0][scope]["grad"] - ranks[0]["none"]["grad"]).double()
    print(f"{scope}: |added grad| {added.norm():.4e}  |reference| {weight.grad.norm():.4e}  "
          f"max diff {(added - weight.grad).abs().max():.2e}")
    assert weight.grad.norm() > 1e-3
    torch.testing.assert_close(added, weight.grad, rtol=1e-4, atol=1e-4 * weight.grad.abs().max().item())


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_logged_loss_equals_hand_computed(measured, scope):
    ranks, E, k = measured["ranks"], measured["E"], measured["k"]
    per_layer = [reference(scope, _inputs(ranks, scope, n), w, E, k).item() / COEFF
                 for n, w in enumerate(measured["weights"])]
    name = "global_load_balancing_loss" if scope == "global_batch" else "load_balancing_loss"
    for r in range(DP):
        assert ranks[r][scope]["extras"][f"moe/{name}"] == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-5)


def test_global_and_micro_batch_scopes_differ(measured):
    """The same hidden states give a different loss per scope (counts over 2 ranks and accumulated)."""
    ranks, E, k = measured["ranks"], measured["E"], measured["k"]
    inputs, w = _inputs(ranks, "global_batch", -1), measured["weights"][-1]
    micro, glob = reference("micro_batch", inputs, w, E, k).item(), reference("global_batch", inputs, w, E, k).item()
    assert abs(micro - glob) > 1e-3 * micro, (micro, glob)
    logged = {s: ranks[0][s]["extras"] for s in ("micro_batch", "global_batch")}
    assert logged["micro_batch"]["moe/load_balancing_loss"] != pytest.approx(
        logged["global_batch"]["moe/global_load_balancing_loss"], rel=1e-4)
