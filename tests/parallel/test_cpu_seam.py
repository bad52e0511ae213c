"""megatron-core 0.16.1 on CPU through ``parallel.cpu_seam``: TP, PP, MoE/EP, DistributedOptimizer, bf16.

Every check runs on 2 gloo ranks started by ``parallel.testing.run_distributed`` and compares a
parallel layout against a reference built from the same weights: a TP=1/PP=1/EP=1 megatron model in
the same process (megatron's parallel state is torn down and rebuilt between phases) or plain torch.
The ``run_*`` functions run in the ranks and return numbers; the tests compare them.
"""
from __future__ import annotations

import re
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel.cpu_seam import apply_cpu_seam, cpu_seam_applied, model_parallel_seed
from parallel.testing import run_distributed

VOCAB, SEQ, SEED = 128, 32, 1234


# --------------------------------------------------------------------------------------------------
# Helpers (run inside the ranks)
# --------------------------------------------------------------------------------------------------
def qwen2_tiny(**overrides) -> TransformerConfig:
    """Qwen2-shaped: GQA 4/2 heads, QKV-only bias, SwiGLU, RMSNorm, fp32, no dropout (parity)."""
    kw = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
              gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
              normalization="RMSNorm", layernorm_epsilon=1e-6, hidden_dropout=0.0, attention_dropout=0.0,
              tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
              pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
              expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
              pipeline_dtype=torch.float32)
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt(config: TransformerConfig, *, vp_stage: int | None = None, tied: bool = False) -> GPTModel:
    vp = dict(ignore_virtual=False, vp_stage=vp_stage) if vp_stage is not None else {}
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, normalization="RMSNorm")
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                    rotary_base=1_000_000, share_embeddings_and_output_weights=tied,
                    pre_process=ps.is_pipeline_first_stage(**vp),
                    post_process=ps.is_pipeline_last_stage(**vp), vp_stage=vp_stage)


def setup(*, tp=1, pp=1, vpp=None, ep=1, seed=SEED) -> None:
    """What ``parallel.mesh.init_distributed`` does after ``init_process_group``."""
    apply_cpu_seam()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep)
    torch.manual_seed(seed)
    model_parallel_seed(seed)


def tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, toks: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of ``toks``; ``model`` may be wrapped (DDP, Float16Module)."""
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(toks)
    return model(toks, pos, None, labels=toks.roll(-1, dims=1)).float().mean()


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def reference_name(model: GPTModel, name: str) -> str:
    """Name of a local parameter in the TP1/PP1/EP1 model: global layer and expert numbers."""
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
    m = re.match(r"decoder\.layers\.(\d+)\.", name)
    if m:
        layer = model.decoder.layers[int(m.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}." + name[m.end():]
        m = re.search(r"\.local_experts\.(\d+)\.", name)
        if m:
            global_idx = layer.mlp.local_expert_indices[int(m.group(1))]
            name = name[:m.start()] + f".local_experts.{global_idx}." + name[m.end():]
    return name


def tp_shard(full: torch.Tensor, param: torch.Tensor, name: str, config: TransformerConfig) -> torch.Tensor:
    """This rank's slice of a TP1 tensor, following the attributes megatron puts on ``param``.

    Column-parallel weights (QKV, fc1, output layer, vocab embedding) split dim 0 and row-parallel
    ones (proj, fc2) dim 1, in contiguous chunks: megatron's QKV rows are already grouped per query
    group ([q_g0, k_g0, v_g0, q_g1, ...]), so a contiguous chunk is whole groups. The SwiGLU fc1 is
    the exception: TP1 stores [gate; up] and each rank holds [gate_r; up_r].
    """
    if not getattr(param, "tensor_model_parallel", False):
        return full
    if ".local_experts." in name:  # expert TP is 1 in these tests: experts split over EP only
        return full
    size, rank, dim = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                       param.partition_dim)
    if name.endswith("linear_fc1.weight") and config.gated_linear_unit:
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(size, dim=dim)[rank]


def load_reference(model: GPTModel, reference: dict[str, torch.Tensor]) -> None:
    """Load a TP1/PP1/EP1 state dict into this rank's part of a parallel model (strict)."""
    params = dict(model.named_parameters())
    state = {}
    for name, value in model.state_dict().items():
        if not torch.is_tensor(value):
            state[name] = value
            continue
        full = reference[reference_name(model, name)]
        shard = tp_shard(full, params[name], name, model.config) if name in params else full
        assert shard.shape == value.shape, (name, shard.shape, value.shape)
        state[name] = shard
    model.load_state_dict(state, strict=True)


def max_diff_to_reference(model: GPTModel, reference: dict[str, torch.Tensor]) -> float:
    params = dict(model.named_parameters())
    worst = 0.0
    for name, p in params.items():
        ref = tp_shard(reference[reference_name(model, name)], p, name, model.config)
        worst = max(worst, (p.detach().float() - ref.float()).abs().max().item())
    return worst


def wrap_ddp(model, config: TransformerConfig, *, distributed_optimizer: bool):
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed_optimizer)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def megatron_optimizer(ddp_model, *, distributed: bool, clip_grad: float, bf16: bool = False):
    cfg = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                          adam_eps=1e-8, clip_grad=clip_grad, use_distributed_optimizer=distributed,
                          bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    return get_megatron_optimizer(cfg, [ddp_model])


def train_step(ddp_model, optimizer, toks: torch.Tensor) -> tuple[float, float]:
    """One step; returns (this rank's loss before the step, grad norm before clipping)."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = lm_loss(ddp_model, toks)
    loss.backward()
    finalize_model_grads([ddp_model])
    ok, grad_norm, _ = optimizer.step()
    assert ok
    return loss.item(), float(grad_norm)


def global_mean(x: float) -> float:
    """Mean over the data-parallel ranks: the loss of the global batch."""
    t = torch.tensor([x], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return t.item() / ps.get_data_parallel_world_size()


# --------------------------------------------------------------------------------------------------
# The harness itself
# --------------------------------------------------------------------------------------------------
def run_echo(rank, world_size, payload, *, scale):
    torch.distributed.all_reduce(t := torch.ones(1))
    return {"rank": rank, "world": world_size, "sum": t.item(), "payload": payload * scale}


def run_fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    torch.distributed.barrier()  # rank 0 waits for a peer that is gone


def run_hang_on_rank_0(rank, world_size):
    if rank == 0:
        time.sleep(600)  # hangs where no collective timeout can see it (rank 1 has finished)


@pytest.mark.timeout(60)
def test_run_distributed_returns_per_rank_results():
    out = run_distributed(run_echo, 2, [1, 2], scale=3, timeout=30)
    assert out == [{"rank": r, "world": 2, "sum": 2.0, "payload": [1, 2] * 3} for r in range(2)]


@pytest.mark.timeout(120)
def test_run_distributed_spawn_start_method():
    # the start method NCCL needs; each rank re-imports torch and megatron-core (~10 s here)
    out = run_distributed(run_echo, 2, "x", scale=2, timeout=90, start_method="spawn")
    assert [o["payload"] for o in out] == ["xx", "xx"] and out[1]["sum"] == 2.0


@pytest.mark.timeout(60)
def test_run_distributed_reraises_the_failing_rank():
    with pytest.raises(ValueError, match="boom on rank 1") as info:
        run_distributed(run_fail_on_rank_1, 2, timeout=30)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "[rank 1 of 2, in fn]" in notes and "run_fail_on_rank_1" in notes


@pytest.mark.timeout(60)
def test_run_distributed_kills_a_hung_rank_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 2 did not finish within 3s"):
        run_distributed(run_hang_on_rank_0, 2, timeout=3)
    assert time.monotonic() - start < 15


# --------------------------------------------------------------------------------------------------
# The seam's own contract
# --------------------------------------------------------------------------------------------------
def run_seam_contract(rank, world_size):
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    te_missing_before = not hasattr(moe_utils, "te_general_gemm")
    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # pretend to be a GPU machine: megatron's CUDA paths stay
    apply_cpu_seam()
    untouched = not cpu_seam_applied() and tp_random.torch is torch
    te_fixed_on_gpu = te_missing_before and moe_utils.te_general_gemm is None  # not a CUDA issue
    torch.cuda.is_available = real_is_available

    apply_cpu_seam()
    apply_cpu_seam()  # idempotent
    hooks = sum(type(f).__name__ == "_PatchOnImport" for f in sys.meta_path)
    # A megatron.core module first imported after the seam gets the CPU torch too.
    late = "megatron.core.optimizer.qk_clip"
    was_loaded = late in sys.modules
    import importlib

    late_mod = importlib.import_module(late)

    # model_parallel_seed: megatron's tracker now drives torch's CPU generator; model-parallel
    # streams differ across TP ranks and repeat for the same seed.
    setup(tp=2)
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    draws = []
    for _ in range(2):
        model_parallel_seed(SEED)
        with get_cuda_rng_tracker().fork():
            draws.append(torch.rand(4))
    # as on GPU, torch's default generator stays as the caller seeded it
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model_parallel_seed(SEED)
    first = torch.rand(1)
    with get_cuda_rng_tracker().fork():  # forking in and out does not disturb it either
        torch.rand(8)
    default_kept = torch.equal(torch.cat([first, torch.rand(2)]), expected)
    return dict(untouched=untouched, te_fixed_on_gpu=te_fixed_on_gpu, applied=cpu_seam_applied(), hooks=hooks,
                late_was_loaded=was_loaded,
                late_patched=late_mod.torch is not torch, same_draws=bool(torch.equal(*draws)),
                draw=draws[0], default_kept=default_kept)


@pytest.mark.timeout(90)
def test_seam_is_idempotent_gpu_noop_and_routes_the_rng():
    r0, r1 = run_distributed(run_seam_contract, 2)
    for r in (r0, r1):
        assert r["untouched"] and r["te_fixed_on_gpu"] and r["applied"] and r["hooks"] == 1
        assert r["late_patched"], "a megatron.core module imported after the seam kept the real torch"
        assert r["same_draws"] and r["default_kept"]
    assert not r0["late_was_loaded"]  # otherwise the late-import check proves nothing
    assert not torch.equal(r0["draw"], r1["draw"])  # TP ranks get different model-parallel streams


# --------------------------------------------------------------------------------------------------
# TP=2 vs TP=1
# --------------------------------------------------------------------------------------------------
def run_tp2_vs_tp1(rank, world_size, clip_grad):
    toks = tokens(2, seed=7)  # the same batch on both ranks
    out = {}
    for tp in (1, 2):
        setup(tp=tp)
        config = qwen2_tiny()
        model = build_gpt(config)
        if tp == 1:
            reference = full_state(model)
        else:
            load_reference(model, reference)
            out["qkv_rows"] = model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
            # tensor_parallel.broadcast_data: TP rank 0's batch reaches the other TP ranks.
            data = {"tokens": toks if ps.get_tensor_model_parallel_rank() == 0 else None}
            got = tensor_parallel.broadcast_data(["tokens"], data, torch.int64)["tokens"]
            out["broadcast_ok"] = torch.equal(got, toks)
        ddp = wrap_ddp(model, config, distributed_optimizer=False)
        opt = megatron_optimizer(ddp, distributed=False, clip_grad=clip_grad)
        loss0, norm0 = train_step(ddp, opt, toks)
        if tp == 1:
            after_step = full_state(model)
        else:
            out["max_weight_diff_after_step"] = max_diff_to_reference(model, after_step)
        with torch.no_grad():
            loss1 = lm_loss(ddp, toks).item()
        out[tp] = (loss0, norm0, loss1)
    return out


@pytest.mark.timeout(120)
def test_tp2_matches_tp1_loss_grad_norm_and_step():
    clip = 0.5
    for r in run_distributed(run_tp2_vs_tp1, 2, clip):
        (l0_1, n_1, l1_1), (l0_2, n_2, l1_2) = r[1], r[2]
        assert r["qkv_rows"] == (4 + 2 * 2) * 16 // 2  # really sharded: half of (q + k + v) rows
        assert r["broadcast_ok"]
        assert abs(l0_1 - l0_2) <= 1e-5, (l0_1, l0_2)
        assert n_1 > clip, "grad clipping must be active for this check"
        assert n_2 == pytest.approx(n_1, rel=1e-5)  # TP-aware norm: replicated norms counted once
        # Adam's first step is ~lr * sign(grad): round-off in near-zero grads moves a few weights by
        # a small fraction of lr (1e-2); a wrong shard or a skipped update moves them by ~lr.
        assert r["max_weight_diff_after_step"] <= 1e-4
        assert abs(l1_1 - l1_2) <= 1e-5, (l1_1, l1_2)
        assert l1_2 < l0_2  # the step did something


def run_recompute_with_dropout(rank, world_size):
    """Full activation recompute replays dropout by saving/restoring the (CPU-routed) RNG states."""
    toks = tokens(2, seed=3)
    out = {}
    full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    for name, recompute in (("plain", {}), ("recompute", full)):
        setup(tp=2)
        model = build_gpt(qwen2_tiny(hidden_dropout=0.1, attention_dropout=0.1, **recompute))
        if name == "plain":
            state = full_state(model)
        else:
            model.load_state_dict(state, strict=False)  # same TP layout: the non-tensor entries are None
        loss = lm_loss(model, toks)
        loss.backward()
        out[name] = dict(loss=loss.item(), grads={n: p.grad.clone() for n, p in model.named_parameters()})
    with torch.no_grad():  # no dropout in eval mode: the dropout runs above really dropped something
        out["eval_loss"] = lm_loss(model.eval(), toks).item()
    return out


@pytest.mark.timeout(120)
def test_full_recompute_replays_dropout_on_cpu():
    results = run_distributed(run_recompute_with_dropout, 2)
    for r in results:
        assert r["recompute"]["loss"] == r["plain"]["loss"] != r["eval_loss"]
        for name, g in r["recompute"]["grads"].items():
            torch.testing.assert_close(g, r["plain"]["grads"][name], rtol=1e-6, atol=1e-9, msg=name)
    # hidden dropout runs outside the TP region: both TP ranks must drop the same activations
    assert results[0]["plain"]["loss"] == results[1]["plain"]["loss"]


# --------------------------------------------------------------------------------------------------
# PP=2 (1F1B and interleaved) vs PP=1
# --------------------------------------------------------------------------------------------------
def _microbatches(n: int) -> list[torch.Tensor]:
    return [tokens(1, seed=100 + i) for i in range(n)]


def _forward_step(data_iterator, model):
    toks = next(data_iterator)
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(toks)
    out = model(toks, pos, None, labels=toks.roll(-1, dims=1))

    def loss_func(output):
        loss = output.float().mean()
        # clone: the schedule divides the returned loss in place by num_microbatches
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def run_pipeline(rank, world_size, num_microbatches):
    mbs = _microbatches(num_microbatches)
    out = {}
    for name, pp, vpp, batch_p2p in (("pp1", 1, None, True), ("1f1b", 2, None, True),
                                     ("interleaved", 2, 2, False), ("interleaved_batched", 2, 2, True)):
        setup(pp=pp, vpp=vpp)
        config = qwen2_tiny(num_layers=4, batch_p2p_comm=batch_p2p,
                            virtual_pipeline_model_parallel_size=vpp)
        chunks = [build_gpt(config, vp_stage=v if vpp else None) for v in range(vpp or 1)]
        if pp == 1:
            reference = full_state(chunks[0])
        else:
            for c in chunks:
                load_reference(c, reference)
        try:
            losses = get_forward_backward_func()(
                forward_step_func=_forward_step, data_iterator=[iter(mbs) for _ in chunks],
                model=chunks, num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=1)
        except RuntimeError as e:
            out[name] = f"RuntimeError: {e}"
            continue
        grads = {}
        for c in chunks:
            for pname, p in c.named_parameters():
                grads[reference_name(c, pname)] = p.grad.detach().clone()
        out[name] = dict(losses=[d["loss"].item() for d in losses], grads=grads,
                         layers=sorted(layer.layer_number for c in chunks for layer in c.decoder.layers))
    return out


@pytest.mark.timeout(120)
def test_pipeline_1f1b_and_interleaved_match_pp1():
    results = run_distributed(run_pipeline, 2, 4)
    ref = results[0]["pp1"]
    assert len(ref["losses"]) == 4
    for schedule in ("1f1b", "interleaved"):
        by_rank = [r[schedule] for r in results]
        layers = [[1, 2], [3, 4]] if schedule == "1f1b" else [[1, 3], [2, 4]]  # interleaved: 1 per chunk
        assert [r["layers"] for r in by_rank] == layers
        last = by_rank[1]
        assert by_rank[0]["losses"] == [] and len(last["losses"]) == 4  # losses live on the last stage
        for a, b in zip(ref["losses"], last["losses"]):
            assert abs(a - b) <= 1e-5, (schedule, ref["losses"], last["losses"])
        grads = {**by_rank[0]["grads"], **by_rank[1]["grads"]}
        assert grads.keys() == ref["grads"].keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=f"{schedule}: {name}")
    for r in results:  # the default batched p2p would swap messages on gloo: refused, loudly
        assert "batch_p2p_comm=False" in r["interleaved_batched"]


def run_tied_pipeline(rank, world_size, num_microbatches):
    """Qwen2-0.5B/1.5B tie the output layer to the embedding: across PP stages that is two copies."""
    mbs = _microbatches(num_microbatches)
    out = {}
    for name, pp in (("pp1", 1), ("1f1b", 2)):
        setup(pp=pp)
        config = qwen2_tiny(num_layers=4)
        model = build_gpt(config, tied=True)  # PP2: megatron all-reduces the stage copies here (.cuda())
        if pp == 1:
            reference = full_state(model)
        else:
            load_reference(model, reference)
        ddp = wrap_ddp(model, config, distributed_optimizer=False)
        config.finalize_model_grads_func = finalize_model_grads  # all-reduces the tied copies' grads
        ddp.zero_grad_buffer()
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(mbs), model=[ddp],
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=1)
        out[name] = dict(losses=[d["loss"].item() for d in losses],
                         grads={(reference_name(model, n), n): p.main_grad.detach().clone()
                                for n, p in model.named_parameters()})
    return out


@pytest.mark.timeout(120)
def test_tied_embeddings_across_two_pipeline_stages_match_pp1():
    r0, r1 = run_distributed(run_tied_pipeline, 2, 4)
    ref = {ref_name: g for (ref_name, _), g in r0["pp1"]["grads"].items()}
    assert r1["1f1b"]["losses"] == pytest.approx(r0["pp1"]["losses"], abs=1e-5)
    stage_grads = {**r0["1f1b"]["grads"], **r1["1f1b"]["grads"]}
    assert ("embedding.word_embeddings.weight", "output_layer.weight") in r1["1f1b"]["grads"]
    for (ref_name, name), g in stage_grads.items():  # both copies carry the full tied gradient
        torch.testing.assert_close(g, ref[ref_name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------
# MoE: EP=2 with alltoall and allgather dispatchers vs EP=1
# --------------------------------------------------------------------------------------------------
def run_moe(rank, world_size):
    toks = tokens(2, seed=11 + rank)  # different tokens per rank: EP really exchanges them
    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64,
               moe_shared_expert_intermediate_size=64, moe_aux_loss_coeff=1e-2)
    out = {}
    for name, ep, dispatcher in (("ep1", 1, "allgather"), ("alltoall", 2, "alltoall"),
                                 ("allgather", 2, "allgather")):
        setup(ep=ep)
        config = qwen2_tiny(**moe, moe_token_dispatcher_type=dispatcher)
        model = build_gpt(config)
        if ep == 1:
            reference = full_state(model)
        else:
            load_reference(model, reference)
        ddp = wrap_ddp(model, config, distributed_optimizer=False)
        ddp.zero_grad_buffer()
        loss = lm_loss(ddp, toks)
        loss.backward()
        finalize_model_grads([ddp])
        grads = {reference_name(model, n): p.main_grad.detach().clone() for n, p in model.named_parameters()}
        out[name] = dict(loss=loss.item(), grads=grads,
                         experts=list(model.decoder.layers[0].mlp.local_expert_indices))
    return out


@pytest.mark.timeout(120)
def test_moe_alltoall_and_allgather_match_ep1():
    results = run_distributed(run_moe, 2)
    for rank, r in enumerate(results):
        assert r["alltoall"]["experts"] == r["allgather"]["experts"] == [2 * rank, 2 * rank + 1]
        assert r["alltoall"]["loss"] == r["allgather"]["loss"]  # identical, not just close
        assert abs(r["alltoall"]["loss"] - r["ep1"]["loss"]) <= 1e-5
        for name, g in r["alltoall"]["grads"].items():
            torch.testing.assert_close(g, r["allgather"]["grads"][name], rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(g, r["ep1"]["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
        assert any(".local_experts." in n for n in r["alltoall"]["grads"])
        assert any(".shared_experts." in n for n in r["alltoall"]["grads"])


# --------------------------------------------------------------------------------------------------
# DistributedOptimizer (DP=2) and bf16 vs plain Adam on the global batch
# --------------------------------------------------------------------------------------------------
def run_optimizers(rank, world_size, clip_grad, steps):
    toks = tokens(1, seed=21 + rank)  # each DP rank its own half of the global batch
    global_batch = torch.cat([tokens(1, seed=21 + r) for r in range(world_size)])
    out = {}

    # Reference: the TP1 model on the whole global batch, torch AdamW + clip_grad_norm_, no megatron
    # parallelism involved.
    setup()
    config = qwen2_tiny()
    model = build_gpt(config)
    reference = full_state(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    losses, norms = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = lm_loss(model, global_batch)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad).item())
        losses.append(loss.item())
        opt.step()
    with torch.no_grad():
        losses.append(lm_loss(model, global_batch).item())
    out["torch"] = dict(losses=losses, norms=norms)

    for name, distributed, bf16 in (("ddp", False, False), ("distopt", True, False), ("bf16", True, True)):
        setup()
        config = qwen2_tiny(bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
        model = build_gpt(config)
        load_reference(model, reference)
        wrapped = Float16Module(config, model) if bf16 else model
        ddp = wrap_ddp(wrapped, config, distributed_optimizer=distributed)
        opt = megatron_optimizer(ddp, distributed=distributed, clip_grad=clip_grad, bf16=bf16)
        losses, norms = [], []
        for _ in range(steps):
            loss, norm = train_step(ddp, opt, toks)
            losses.append(global_mean(loss))
            norms.append(norm)
        with torch.no_grad():
            losses.append(global_mean(lm_loss(ddp, toks).item()))
        inner = getattr(opt, "chained_optimizers", [opt])
        res = dict(losses=losses, norms=norms, optimizers=sorted({type(o).__name__ for o in inner}))
        if name == "distopt":
            # The gather behind sharded_state_dict(..."fully_reshardable"): every rank gets all shards.
            state = inner[0].get_parameter_state_dp_zero(use_gloo_comm=False, return_on_all_ranks=True)
            gathered = torch.cat([t["param"] for gbuf, by_dtype in state.items()
                                  if gbuf != "buckets_coalesced" for t in by_dtype.values()])
            params = torch.cat([p.detach().view(-1) for p in model.parameters()])
            res["gathered_state_ok"] = (gathered.numel() == params.numel()
                                        and torch.allclose(gathered.sort().values, params.sort().values))
        if bf16:
            # bf16 model weights are the rounded fp32 main params after the step.
            res["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
            shards = [s for o in inner for s in _bf16_shards(o)]
            res["main_dtypes"] = sorted({str(m.dtype) for _, m, _ in shards})
            res["bf16_is_rounded_main"] = len(shards) > 0 and all(
                torch.equal(p.detach().view(-1)[r.start:r.end], m.detach().bfloat16()) for p, m, r in shards)
        out[name] = res
    return out


def _bf16_shards(opt):
    """(model param, its fp32 main shard, the shard's range in the param) for this DP rank."""
    for model_group, main_group in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
        for p, main in zip(model_group, main_group):
            gbuf_index, dtype, bucket = opt.model_param_gbuf_map[p]
            r = opt.gbuf_ranges[gbuf_index][dtype][bucket]["param_map"][p]["param"]
            yield p, main, r


@pytest.mark.timeout(120)
def test_distributed_optimizer_and_bf16_match_plain_adam():
    clip, steps = 0.5, 2
    results = run_distributed(run_optimizers, 2, clip, steps)
    ref = results[0]["torch"]
    assert ref["norms"][0] > clip, "grad clipping must be active for this check"
    for r in results:
        assert r["distopt"]["optimizers"] == r["bf16"]["optimizers"] == ["DistributedOptimizer"]
        assert r["distopt"]["gathered_state_ok"]
        for name in ("ddp", "distopt"):
            assert r[name]["losses"] == pytest.approx(ref["losses"], abs=1e-5), name
            assert r[name]["norms"] == pytest.approx(ref["norms"], rel=1e-4), name
        assert abs(r["bf16"]["losses"][0] - ref["losses"][0]) <= 1e-2
        assert r["bf16"]["losses"] == pytest.approx(ref["losses"], abs=5e-2)
        assert r["bf16"]["losses"][-1] < r["bf16"]["losses"][0]
        assert r["bf16"]["param_dtypes"] == ["torch.bfloat16"]
        assert r["bf16"]["main_dtypes"] == ["torch.float32"]
        assert r["bf16"]["bf16_is_rounded_main"]
