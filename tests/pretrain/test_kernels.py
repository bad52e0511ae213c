"""GPU-side kernels (issue 16), each proven on the CPU against the plain path it replaces.

``trainer.fused_swiglu`` (megatron-core's bias_activation_fusion), ``trainer.cross_entropy=fused`` (its native
fused cross-entropy), ``trainer.cross_entropy=chunked`` (our output layer + cross-entropy in chunks),
``trainer.moe_grouped_gemm`` (GroupedMLP on torch._grouped_mm) and ``optim.foreach_grad_norm``: the same job with
and without each gives the same losses, gradient norms and weights (fp32: 1e-5; bf16: within bf16 rounding).
The chunked loss also keeps far fewer bytes for backward than the plain path (measured with
saved_tensors_hooks). One ``run_distributed`` call (1 rank) runs every case: 2 layers, 32-token sequences, 2 steps.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common.errors import ConfigError
from jobs import STEPS, batches, make_job, start
from parallel.testing import run_distributed

MOE = dict(num_layers=1, num_experts=4, moe_topk=2, moe_ffn_hidden_size=64, shared_expert_ffn_hidden_size=64)
# name -> (model overrides, trainer overrides, optim overrides)
PLAIN = dict(fused_swiglu=False, cross_entropy="megatron", moe_grouped_gemm=False)
CASES = {
    "fp32-plain": ({}, dict(PLAIN), dict(foreach_grad_norm=False)),
    "fp32-foreach-norm": ({}, dict(PLAIN), dict(foreach_grad_norm=True)),
    "fp32-swiglu": ({}, dict(PLAIN, fused_swiglu=True), dict(foreach_grad_norm=False)),
    "fp32-chunked": ({}, dict(PLAIN, cross_entropy="chunked", cross_entropy_chunk=24), dict(foreach_grad_norm=False)),
    "bf16-plain": ({}, dict(PLAIN, precision="bf16"), {}),
    "bf16-fused-ce": ({}, dict(PLAIN, precision="bf16", cross_entropy="fused"), {}),
    "bf16-chunked": ({}, dict(PLAIN, precision="bf16", cross_entropy="chunked", cross_entropy_chunk=40), {}),
    # One layer: its router sees the same input on both sides, so the first step routes identically (a second
    # layer's router would see bf16 rounding differences of the first layer's experts and may flip a token).
    "moe-bf16-sequential": (MOE, dict(PLAIN, precision="bf16"), {}),
    "moe-bf16-grouped": (MOE, dict(PLAIN, precision="bf16", moe_grouped_gemm=True), {}),
}


def _job(model: dict, trainer: dict, optim: dict):
    return make_job(model=model, trainer={"eval_every": 0, **trainer}, optim=optim)


def _gpt(module):
    from pretrain.models.hf import unwrap_chunk

    return unwrap_chunk(module.chunks[0])


def _expert_weights(gpt) -> dict[str, torch.Tensor]:
    """Every parameter in SequentialMLP naming (GroupedMLP's fused expert weights split per expert, transposed)."""
    out = {}
    for name, p in gpt.named_parameters():
        p = p.detach().float().clone()
        if name.endswith("experts.weight1") or name.endswith("experts.weight2"):
            prefix, which = name.rsplit(".", 1)
            n = gpt.config.num_moe_experts
            # GroupedMLP reads weight1 [h, E * 2f] as .view(E, h, 2f) and weight2 [E * f, h] as .view(E, f, h)
            if which == "weight1":  # -> per expert fc1 [2f, h]
                for e, w in enumerate(p.view(n, gpt.config.hidden_size, -1).unbind(0)):
                    out[f"{prefix}.local_experts.{e}.linear_fc1.weight"] = w.t().contiguous()
            else:  # [E * f, h] -> per expert fc2 [h, f]
                for e, w in enumerate(p.view(n, -1, p.shape[1]).unbind(0)):
                    out[f"{prefix}.local_experts.{e}.linear_fc2.weight"] = w.t().contiguous()
        else:
            out[name] = p
    return out


class _GradView:
    """``named_parameters`` yielding each parameter's main_grad (for :func:`_expert_weights`)."""

    def __init__(self, gpt) -> None:
        self.config, self.gpt = gpt.config, gpt

    def named_parameters(self):
        return ((n, p.main_grad) for n, p in self.gpt.named_parameters())


def _load_expert_weights(module, weights: dict[str, torch.Tensor]) -> None:
    """Give a (grouped) model the sequential model's initial weights, then refresh the optimizer's fp32 copies."""
    gpt = _gpt(module)
    n = gpt.config.num_moe_experts
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("experts.weight1"):
                prefix = name.rsplit(".", 1)[0]
                w = torch.stack([weights[f"{prefix}.local_experts.{e}.linear_fc1.weight"].t() for e in range(n)], 0)
                p.copy_(w.reshape(p.shape))
            elif name.endswith("experts.weight2"):
                prefix = name.rsplit(".", 1)[0]
                w = torch.stack([weights[f"{prefix}.local_experts.{e}.linear_fc2.weight"].t() for e in range(n)], 0)
                p.copy_(w.reshape(p.shape))
            else:
                p.copy_(weights[name])
    module.optimizer.reload_model_params()


def _run_case(name: str, model: dict, trainer: dict, optim: dict, init: dict | None) -> dict:
    job = _job(model, trainer, optim)
    module = start(job, world_size=1)
    if init is not None:
        _load_expert_weights(module, init)
    gpt = _gpt(module)
    out = {"init": _expert_weights(gpt),
           "experts": type(gpt.decoder.layers[0].mlp.experts).__name__ if job.model.is_moe else None,
           "config": {k: getattr(module.config, k) for k in ("bias_activation_fusion", "cross_entropy_loss_fusion",
                                                              "moe_grouped_gemm")},
           "chunk": gpt.cross_entropy_chunk}
    data = batches(STEPS + 1)
    out["steps"] = [dataclasses.asdict(module.train_batch(data[0]))]
    out["grads_step1"] = _expert_weights(_GradView(gpt))  # from the same weights on both sides
    out["steps"] += [dataclasses.asdict(module.train_batch(b)) for b in data[1:STEPS]]
    out["eval"] = module.evaluate(data[-1:])
    out["params"] = _expert_weights(gpt)
    # the last step's fp32 gradients (megatron's main_grad buffers; GroupedMLP's fused experts split as weights)
    out["grads"] = _expert_weights(_GradView(gpt))
    from megatron.core.optimizer import clip_grads

    out["norm_impl"] = clip_grads.l2_norm_impl.__name__
    return out


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    return sum(seen.values()), loss


def _chunked_unit() -> dict:
    """The chunked loss against the plain path (output GEMM + megatron's vocab-parallel cross-entropy) on
    one layer's output: values, gradients and the bytes each keeps for backward."""
    from megatron.core import tensor_parallel

    from pretrain.models.decoder.loss import chunked_linear_cross_entropy

    g = torch.Generator().manual_seed(3)
    s, b, h, v = 96, 2, 32, 4096
    hidden = torch.randn(s, b, h, generator=g, dtype=torch.float64).float()
    weight = (torch.randn(v, h, generator=g) * 0.2)
    labels = torch.randint(0, v, (b, s), generator=g)
    grad = torch.rand(b, s, generator=g)
    out = {"tokens": s * b, "vocab": v, "hidden": h}

    def plain():
        logits = hidden_p @ weight_p.t()
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()

    def chunked():
        return chunked_linear_cross_entropy(hidden_c, weight_c, labels, 50)

    hidden_p, weight_p = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    hidden_c, weight_c = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out["plain_bytes"], loss_p = _saved_bytes(plain)
    out["chunked_bytes"], loss_c = _saved_bytes(chunked)
    (loss_p * grad).sum().backward()
    (loss_c * grad).sum().backward()
    # float64 reference
    ref = torch.nn.functional.cross_entropy((hidden.double() @ weight.double().t()).transpose(0, 1).reshape(-1, v),
                                            labels.reshape(-1), reduction="none").view(b, s)
    out["loss_err"] = float((loss_c.double() - ref).abs().max())
    out["loss_err_plain"] = float((loss_p.double() - ref).abs().max())
    out["grad_hidden_err"] = float((hidden_c.grad - hidden_p.grad).abs().max() / hidden_p.grad.abs().max())
    out["grad_weight_err"] = float((weight_c.grad - weight_p.grad).abs().max() / weight_p.grad.abs().max())
    return out


def run_cases(rank: int, world_size: int) -> dict:
    out = {}
    for name, case in CASES.items():
        init = out["moe-bf16-sequential"]["init"] if name == "moe-bf16-grouped" else None
        out[name] = _run_case(name, *case, init)
    out["unit"] = _chunked_unit()
    return out


@pytest.fixture(scope="module")
def runs() -> dict:
    (result,) = run_distributed(run_cases, 1, timeout=900)
    return result


def _close(a: dict, b: dict, *, loss: float, weights: float | None, norm: float, moved: float | None = None) -> None:
    """Losses, eval loss and grad norms within ``loss`` / ``norm`` (relative); every weight within ``weights``
    (max abs) or, with ``moved``, each weight tensor's difference within ``moved`` x how far it moved in training
    (L2); every gradient tensor of the last step within ``norm`` relative (L2)."""
    for x, y in zip(a["steps"], b["steps"], strict=True):
        assert not x["skipped"] and not y["skipped"]
        assert abs(x["loss"] - y["loss"]) <= loss, (x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= norm * abs(y["grad_norm"]), (x["grad_norm"], y["grad_norm"])
    assert abs(a["eval"][0] - b["eval"][0]) <= loss and a["eval"][1] == b["eval"][1]
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        if moved is None:
            diff = (a["params"][k] - b["params"][k]).abs().max().item()
            assert diff <= weights, (k, diff)
        else:
            diff = (a["params"][k] - b["params"][k]).norm().item()
            assert diff <= moved * (b["params"][k] - b["init"][k]).norm().item() + 1e-6, (k, diff)
    for k in a["grads"]:
        rel = ((a["grads"][k] - b["grads"][k]).norm() / b["grads"][k].norm().clamp_min(1e-12)).item()
        assert rel <= norm, (k, rel)


def test_the_knobs_reach_megatron(runs):
    assert runs["fp32-plain"]["config"] == dict(bias_activation_fusion=False, cross_entropy_loss_fusion=False,
                                                moe_grouped_gemm=False)
    assert runs["fp32-swiglu"]["config"]["bias_activation_fusion"]
    assert runs["bf16-fused-ce"]["config"]["cross_entropy_loss_fusion"]
    assert runs["fp32-chunked"]["chunk"] == 24 and runs["fp32-plain"]["chunk"] == 0
    assert runs["moe-bf16-sequential"]["experts"] == "SequentialMLP"
    assert runs["moe-bf16-grouped"]["experts"] == "GroupedMLP" and runs["moe-bf16-grouped"]["config"]["moe_grouped_gemm"]
    assert runs["fp32-plain"]["norm_impl"] == "local_multi_tensor_l2_norm"
    assert runs["fp32-foreach-norm"]["norm_impl"] == "_foreach_l2_norm"


@pytest.mark.parametrize("name", ["fp32-foreach-norm", "fp32-swiglu", "fp32-chunked"])
def test_fp32_kernel_matches_plain(runs, name):
    # Same initial weights (same seed, same shapes), then the same two steps.
    assert all(torch.equal(runs[name]["init"][k], v) for k, v in runs["fp32-plain"]["init"].items())
    _close(runs[name], runs["fp32-plain"], loss=1e-5, weights=1e-5, norm=1e-5)


@pytest.mark.parametrize("name", ["bf16-fused-ce", "bf16-chunked"])
def test_bf16_kernel_matches_plain(runs, name):
    # bf16 weights and activations: the kernels round at other places (chunked: the weight gradient summed in
    # fp32 over chunks), so agreement is to bf16 precision: fp32 gradients within 1% (L2, per tensor). Adam's
    # first steps move a weight by ~lr x sign(gradient), so a rounding-level flip of a near-zero gradient moves
    # that one weight by up to 2 lr: weights are compared by how far they moved (within 10%; a wrong gradient
    # gives a difference as large as the move itself).
    _close(runs[name], runs["bf16-plain"], loss=2e-3, weights=None, norm=1e-2, moved=0.1)


def test_grouped_experts_match_sequential(runs):
    seq, grouped = runs["moe-bf16-sequential"], runs["moe-bf16-grouped"]
    assert all(torch.equal(grouped["init"][k], v) for k, v in seq["init"].items())  # loaded the same weights
    # Routing is discrete: once the weights differ by bf16 rounding a token may go to another expert and the
    # steps part ways, so the first step (same weights, same routing) is compared tensor by tensor, later ones
    # by loss.
    for x, y in zip(grouped["steps"], seq["steps"], strict=True):
        assert abs(x["loss"] - y["loss"]) <= 5e-3, (x["loss"], y["loss"])
    assert abs(grouped["steps"][0]["grad_norm"] - seq["steps"][0]["grad_norm"]) <= 1e-2 * seq["steps"][0]["grad_norm"]
    a, b = grouped["grads_step1"], seq["grads_step1"]
    assert a.keys() == b.keys() and any("local_experts" in k for k in a)
    for k in a:
        rel = ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-2, (k, rel)


def test_chunked_loss_keeps_no_logits(runs):
    u = runs["unit"]
    logits_fp32 = u["tokens"] * u["vocab"] * 4
    assert u["plain_bytes"] >= logits_fp32  # megatron's CE keeps an fp32 [tokens x vocab] softmax
    # chunked: the hidden states, the weight, labels and one fp32 log-sum-exp per token
    assert u["chunked_bytes"] <= u["tokens"] * (u["hidden"] * 4 + 16) + u["vocab"] * u["hidden"] * 4
    assert u["chunked_bytes"] * 5 < u["plain_bytes"]
    assert u["loss_err"] < 1e-4 and u["loss_err_plain"] < 1e-4
    assert u["grad_hidden_err"] < 1e-5 and u["grad_weight_err"] < 1e-5


def test_gmm_matches_a_loop():
    from pretrain.models.decoder.grouped_gemm import gmm, gmm_loop

    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([5, 0, 9, 2])  # an expert with no tokens, too
    a = torch.randn(16, 8, generator=g).requires_grad_()
    b = torch.randn(4, 8, 12, generator=g).requires_grad_()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out, ref = gmm(a, b, sizes), gmm_loop(a2, b2, sizes)
    out.sum().backward()  # a stride-0 gradient: the case _grouped_mm's own backward refuses
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    bt = b.detach().transpose(1, 2).contiguous()
    torch.testing.assert_close(gmm(a.detach(), bt, sizes, trans_b=True), ref.detach())


def test_config_errors():
    from pretrain.config import validate_job

    with pytest.raises(ConfigError, match="trainer.cross_entropy=fused needs trainer.precision=bf16"):
        _job({}, dict(cross_entropy="fused"), {})
    with pytest.raises(ConfigError, match="trainer.moe_grouped_gemm=true needs trainer.precision=bf16"):
        _job({}, dict(moe_grouped_gemm=True), {})
    with pytest.raises(ConfigError, match="trainer.cross_entropy must be one of"):
        _job({}, dict(cross_entropy="liger"), {})
    job = _job({}, dict(cross_entropy="chunked"), {})
    job.parallel = dataclasses.replace(job.parallel, tp=2)
    with pytest.raises(ConfigError, match="trainer.cross_entropy=chunked runs with parallel.tp=1"):
        validate_job(job, world_size=2)


def test_auto_resolves_per_device():
    from pretrain.config import TrainerConfig
    from pretrain.models.decoder.model import resolve_kernels

    # Grouped expert GEMMs are opt-in by default (HF export does not read their checkpoints yet); null = auto.
    assert resolve_kernels(TrainerConfig(precision="bf16"), on_cuda=True)["moe_grouped_gemm"] is False
    bf16, fp32 = TrainerConfig(precision="bf16", moe_grouped_gemm=None), TrainerConfig(precision="fp32", moe_grouped_gemm=None)
    assert resolve_kernels(bf16, on_cuda=True) == dict(fused_swiglu=True, cross_entropy="fused", moe_grouped_gemm=True)
    assert resolve_kernels(fp32, on_cuda=True) == dict(fused_swiglu=True, cross_entropy="megatron",
                                                       moe_grouped_gemm=False)
    assert resolve_kernels(bf16, on_cuda=False) == dict(fused_swiglu=False, cross_entropy="megatron",
                                                        moe_grouped_gemm=False)
