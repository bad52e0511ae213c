"""Qwen2 / Qwen2-MoE on our megatron-core model vs transformers, through the HF adapter and the converter.

One 2-rank gloo job (``run_parity``) walks through every layout, tearing megatron's parallel state
down and rebuilding it between them: for each it builds the model chunks, loads the HF weights through
``pretrain.models.hf`` (or a converted checkpoint), and measures logits / loss / routing against transformers'
output computed here in the parent, plus the HF -> megatron -> HF round trip. It also saves checkpoints
(model-only and a full trainer checkpoint) that the tests then export back to HF. The tests only read
the numbers it returns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parallel.testing import run_distributed

REPO = Path(__file__).resolve().parents[2]
B, S = 2, 32
LOGIT_TOL, LOSS_TOL = 1e-4, 1e-5

# name -> (HF model, parallel layout on 2 ranks, how the weights get in: "hf" adapter, "init_hf" hook, "import")
CASES = {
    "dense-tp1": ("dense", dict(), "hf"),
    "dense-tp2": ("dense", dict(tp=2), "init_hf"),
    "dense-pp2": ("dense", dict(pp=2), "hf"),
    "dense-pp2-vpp2": ("dense", dict(pp=2, vpp=2), "hf"),
    "moe-tp1": ("moe", dict(), "hf"),
    "moe-tp2": ("moe", dict(tp=2), "hf"),
    "moe-ep2": ("moe", dict(ep=2), "hf"),
    "moe-tp2-ep2-etp1": ("moe", dict(tp=2, ep=2, etp=1), "hf"),
    "moe-pp2": ("moe", dict(pp=2), "hf"),
    "pad-tied-tp2": ("dense_pad", dict(tp=2), "init_hf"),
    "pad-tied-pp2": ("dense_pad", dict(pp=2), "import"),
    # Qwen3 family: no QKV bias, QK-norm, head_dim 32 != hidden / heads; MoE: normalised top-k, no shared expert
    "qwen3-tp1": ("qwen3", dict(), "hf"),
    "qwen3-tp2": ("qwen3", dict(tp=2), "init_hf"),
    "qwen3-pp2": ("qwen3", dict(pp=2), "hf"),
    "qwen3_moe-tp1": ("qwen3_moe", dict(), "hf"),
    "qwen3_moe-ep2": ("qwen3_moe", dict(ep=2), "hf"),
    "qwen3_moe-tp2-ep2-etp1": ("qwen3_moe", dict(tp=2, ep=2, etp=1), "init_hf"),
}
MEGATRON_VOCAB = 256  # dense_pad has 250 HF rows: 6 padding rows


# --------------------------------------------------------------------------------------------------
# Inside the ranks
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _may_start_processes():
    """run_distributed's ranks are daemonic processes, and megatron's torch_dist writer starts helper
    processes (a spawn Manager, forked file writers), which daemonic processes may not: lift the flag
    while saving."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    config = multiprocessing.current_process()._config
    was = config.get("daemon")
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = was
        # Stop the writer's Manager now: the ranks may be killed once they report, orphaning it.
        queue = filesystem_async._results_queue
        if queue is not None:
            queue._manager.shutdown()
            filesystem_async._results_queue = None


def _setup(layout: dict) -> None:
    from megatron.core import parallel_state as ps

    from parallel.config import ParallelConfig
    from parallel.mesh import init_distributed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(ParallelConfig(**layout), seed=0)


def _build(model, layout: dict):
    import torch.distributed as dist

    from parallel.config import ParallelConfig
    from parallel.layout import ParallelLayout
    from pretrain.models.decoder.model import build_model_chunks, transformer_config

    config = transformer_config(model, layout=ParallelLayout.resolve(ParallelConfig(**layout),
                                                                      world_size=dist.get_world_size()))
    return build_model_chunks(model, config, MEGATRON_VOCAB)


def _forward(chunks, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] (or per-token loss [b, s] with labels) on last-stage ranks, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(S).unsqueeze(0).expand(B, S)

    def step(data_iterator, model):
        toks, labs = next(data_iterator)
        out = model(toks, position_ids, None, labels=labs)
        return out, lambda o: (o.sum(), {"out": o.detach()})

    microbatches = ps.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    iterators = [iter([(tokens, labels)] * microbatches) for _ in chunks]
    for c in chunks:
        c.eval()
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=microbatches, seq_length=S,
            micro_batch_size=B, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    out = store[0]["out"]
    if labels is None and ps.get_tensor_model_parallel_world_size() > 1:
        parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def _record_routing(chunks, maps: dict):
    """Hooks that store each router's routing map [s*b, E] under its global layer number."""
    from pretrain.models.hf import unwrap_chunk

    handles = []
    for c in chunks:
        for layer in unwrap_chunk(c).decoder.layers:
            def hook(_module, _inputs, output, n=layer.layer_number - 1):
                maps[n] = output[1].detach().clone()
            handles.append(layer.mlp.router.register_forward_hook(hook))
    return handles


def _megatron_aux_losses(chunks, tokens, labels, num_layers) -> list[float]:
    """Per-layer load-balancing loss / coeff, as megatron's router computes it in a training forward."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    clear_aux_losses_tracker()
    (chunk,) = chunks
    chunk.train()
    position_ids = torch.arange(S).unsqueeze(0).expand(B, S)
    with torch.enable_grad():
        chunk(tokens, position_ids, None, labels=labels)
    values = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
    return values[:num_layers].tolist()


def _round_trip(chunks, model, hf_dir: Path, hf_vocab: int) -> list[str]:
    """Gather every rank's local state dicts, map them back to HF, list tensors not bit-identical."""
    import torch.distributed as dist

    from pretrain.models.hf import HFCheckpoint, Layout, local_state_dict, to_hf

    mine = [(Layout.current(vp_stage=i if len(chunks) > 1 else None), local_state_dict(c))
            for i, c in enumerate(chunks)]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() != 0:
        return []
    back = to_hf([s for rank in everyone for s in rank], model, hf_vocab_size=hf_vocab)
    original = HFCheckpoint(hf_dir)
    bad = sorted(set(back) ^ set(original))
    bad += [k for k in original if k in back and not torch.equal(back[k], original[k])]
    return bad


def run_parity(rank: int, world_size: int, hf_dirs: dict, refs: dict, import_dir: Path, out_root: Path) -> dict:
    from pretrain.convert import init_chunks_from, save_model_checkpoint
    from pretrain.models.hf import (
        HFCheckpoint, Layout, load_hf_into_chunks, model_config_from_hf, unwrap_chunk)

    results = {}
    for case, (name, layout, source) in CASES.items():
        _setup(layout)
        hf = HFCheckpoint(hf_dirs[name])
        model = dataclasses.replace(model_config_from_hf(hf.config), vocab_size=MEGATRON_VOCAB)
        chunks = _build(model, layout)
        if source == "hf":
            load_hf_into_chunks(chunks, hf, model)
        else:
            init_chunks_from(chunks, model, hf_dirs[name] if source == "init_hf" else import_dir)
        ref = refs[name]
        r: dict = {"offsets_ok": True}
        for i, c in enumerate(chunks):  # our layer/expert numbering against megatron's own
            gpt, lay = unwrap_chunk(c), Layout.current(vp_stage=i if len(chunks) > 1 else None)
            r["offsets_ok"] &= [l.layer_number - 1 for l in gpt.decoder.layers] == list(lay.layers(model))
            if model.is_moe:
                r["offsets_ok"] &= list(gpt.decoder.layers[0].mlp.local_expert_indices) == list(lay.experts(model))
        maps: dict = {}
        handles = _record_routing(chunks, maps) if model.is_moe else []
        logits = _forward(chunks, ref["tokens"])
        for h in handles:
            h.remove()
        labels = torch.cat([ref["tokens"][:, 1:], torch.zeros(B, 1, dtype=torch.long)], dim=1)
        per_token = _forward(chunks, ref["tokens"], labels)
        if logits is not None:
            hf_vocab = ref["logits"].shape[-1]
            r["logit_diff"] = (logits[..., :hf_vocab] - ref["logits"]).abs().max().item()
            r["padding_logits_max"] = logits[..., hf_vocab:].abs().max().item() if logits.shape[-1] > hf_vocab else 0.0
            r["loss"] = per_token[:, :-1].mean().item()
        if maps:
            # megatron tokens run [s, b]-major; HF's [b, s]
            chosen = {n: m.nonzero()[:, 1].reshape(S, B, -1).transpose(0, 1).reshape(B * S, -1)
                      for n, m in maps.items()}
            r["routing_layers"] = sorted(chosen)
            r["routing_mismatch"] = sum(int((chosen[n] != ref["topk"][n]).any(-1).sum()) for n in chosen)
        r["roundtrip_bad"] = _round_trip(chunks, model, hf_dirs[name], ref["logits"].shape[-1])
        r["inv_freq_equal"] = all(torch.equal(unwrap_chunk(c).rotary_pos_emb.inv_freq, ref["inv_freq"]) for c in chunks)
        if case == "moe-tp1":
            r["aux_per_layer"] = _megatron_aux_losses(chunks, ref["tokens"], labels, model.num_layers)
        if case in ("dense-tp2", "moe-tp2-ep2-etp1", "qwen3_moe-tp2-ep2-etp1"):
            common = {"model_config": dataclasses.asdict(model), "hf_vocab_size": ref["logits"].shape[-1]}
            with _may_start_processes():
                save_model_checkpoint(chunks, out_root / f"ckpt-{case}", common)
        results[case] = r
    results["trainer_checkpoint"] = _trainer_checkpoint(hf_dirs["dense"], out_root / "run", refs["dense"]["tokens"])
    return results


def _trainer_checkpoint(hf_dir: Path, run_dir: Path, tokens: torch.Tensor) -> tuple[str, dict]:
    """A real trainer checkpoint (model + distributed optimizer + schedule) at TP2 after one step from
    the HF weights, and the weights it should hold (in HF naming, gathered from the ranks)."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from parallel.config import ParallelConfig
    from pretrain.build import build_train_module
    from pretrain.checkpoint import Checkpointer
    from pretrain.config import DataConfig, JobConfig, TrainerConfig
    from pretrain.convert import init_chunks_from
    from pretrain.models.hf import HFCheckpoint, Layout, local_state_dict, model_config_from_hf, to_hf

    _setup(dict(tp=2))
    model = model_config_from_hf(HFCheckpoint(hf_dir).config, name="dense")
    job = JobConfig(model=model, parallel=ParallelConfig(tp=2), data=DataConfig(seq_len=S),
                    trainer=TrainerConfig(micro_batch_size=B, global_batch_size=B))
    module = build_train_module(job, MEGATRON_VOCAB)
    init_chunks_from(module.chunks, model, hf_dir)
    module.optimizer.reload_model_params()  # the hook belongs before the optimizer; here it runs after
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    # (The distributed optimizer cannot save before its first step: its state does not exist yet.)
    module.train_batch([dict(tokens=tokens, labels=labels, loss_mask=torch.ones(B, S),
                             position_ids=torch.arange(S).unsqueeze(0).expand(B, S))])
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True)
        (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(job)))
    with _may_start_processes():
        Checkpointer(run_dir / "checkpoints", keep_last=1).save(1, module, {"step": 1, "tokens_seen": B * S})
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (Layout.current(), local_state_dict(module.chunks[0])))
    return str(run_dir / "checkpoints"), to_hf(shards, model)


# --------------------------------------------------------------------------------------------------
# In the parent: transformers references, the 2-rank job, the tests
# --------------------------------------------------------------------------------------------------
def _hf_reference(hf_dir: Path, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))
    moe = model.config.model_type in ("qwen2_moe", "qwen3_moe")
    with torch.no_grad():
        out = model(tokens, labels=tokens)
        ref = {"tokens": tokens, "logits": out.logits.float(), "loss": out.loss.item(),
               "inv_freq": model.model.rotary_emb.inv_freq.clone()}
        if moe:
            routed = model(tokens, labels=tokens, output_router_logits=True)
            ref["router_logits"] = [g.float() for g in routed.router_logits]  # per layer [b*s, E]
            k = model.config.num_experts_per_tok
            ref["topk"] = [torch.topk(F.softmax(g, dim=-1), k).indices.sort(-1).values for g in ref["router_logits"]]
            ref["hf_aux"] = routed.aux_loss.item()
    return ref


@pytest.fixture(scope="module")
def parity(hf_dirs, tmp_path_factory) -> dict:
    out_root = tmp_path_factory.mktemp("parity")
    import_dir = out_root / "import-pad"
    # The CLI in its own process (it starts a process group), with vocabulary padding 250 -> 256.
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.convert", "import", "--hf", str(hf_dirs["dense_pad"]),
         "--out", str(import_dir), "--vocab-size", str(MEGATRON_VOCAB)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    refs = {name: _hf_reference(d, seed=i) for i, (name, d) in enumerate(hf_dirs.items())}
    ranks = run_distributed(run_parity, 2, dict(hf_dirs), refs, import_dir, out_root, timeout=400)
    trainer_root, trained = ranks[0]["trainer_checkpoint"]
    merged: dict = {"refs": refs, "import_dir": import_dir, "out_root": out_root,
                    "trainer_checkpoint": Path(trainer_root), "trained": trained}
    for case in CASES:
        per_rank = [r[case] for r in ranks]
        m = {"offsets_ok": all(r["offsets_ok"] for r in per_rank),
             "inv_freq_equal": all(r["inv_freq_equal"] for r in per_rank),
             "roundtrip_bad": per_rank[0]["roundtrip_bad"]}
        measured = [r for r in per_rank if "logit_diff" in r]  # last pipeline stage only
        m["ranks_measured"] = len(measured)
        for key in ("logit_diff", "padding_logits_max"):
            m[key] = max(r[key] for r in measured)
        m["losses"] = [r["loss"] for r in measured]
        if "routing_mismatch" in per_rank[0]:
            m["routing_mismatch"] = max(r["routing_mismatch"] for r in per_rank)
            m["routing_layers"] = sorted(set().union(*(r["routing_layers"] for r in per_rank)))
        if "aux_per_layer" in per_rank[0]:
            m["aux_per_layer"] = per_rank[0]["aux_per_layer"]
        merged[case] = m
    _print_numbers(merged)
    return merged


def _print_numbers(parity) -> None:
    """The measured numbers, for the record (``pytest -s``)."""
    for case, (name, _, _) in CASES.items():
        m, hf_loss = parity[case], parity["refs"][name]["loss"]
        dloss = max(abs(loss - hf_loss) for loss in m["losses"])
        print(f"{case:18s} max|dlogit|={m['logit_diff']:.2e} max|dloss|={dloss:.2e} "
              f"routing_mismatch={m.get('routing_mismatch', '-')}")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(parity, case):
    m = parity[case]
    assert m["offsets_ok"], "layer/expert numbering differs from megatron's own"
    assert m["ranks_measured"] >= 1
    assert m["logit_diff"] <= LOGIT_TOL, m["logit_diff"]
    assert m["inv_freq_equal"], "RoPE inverse frequencies differ from HF's (fp32)"


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] != "dense_pad"])
def test_loss_matches_transformers(parity, case):
    name = CASES[case][0]
    for loss in parity[case]["losses"]:
        assert abs(loss - parity["refs"][name]["loss"]) <= LOSS_TOL, (loss, parity["refs"][name]["loss"])


@pytest.mark.parametrize("case", ["pad-tied-tp2", "pad-tied-pp2"])
def test_vocab_padding_rows_are_zero_logits(parity, case):
    """Padding rows give logits of exactly 0, which megatron's softmax includes (documented)."""
    m, ref = parity[case], parity["refs"]["dense_pad"]
    assert m["padding_logits_max"] == 0.0
    hf_logits, tokens = ref["logits"], ref["tokens"]
    padded = torch.cat([hf_logits, torch.zeros(B, S, MEGATRON_VOCAB - hf_logits.shape[-1])], dim=-1)
    expected = F.cross_entropy(padded[:, :-1].reshape(-1, MEGATRON_VOCAB), tokens[:, 1:].reshape(-1)).item()
    for loss in m["losses"]:
        assert abs(loss - expected) <= LOSS_TOL
        assert abs(loss - ref["loss"]) > 10 * LOSS_TOL  # the padding really is in the softmax


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] in ("moe", "qwen3_moe")])
def test_router_chooses_the_same_experts(parity, case):
    m = parity[case]
    assert m["routing_layers"] == [0, 1, 2, 3], "not every router was observed"
    assert m["routing_mismatch"] == 0


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical(parity, case):
    assert parity[case]["roundtrip_bad"] == []


def _counts_probs(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens routed to each expert (over the top-k choices) and summed router probability per expert."""
    probs = F.softmax(router_logits.float(), dim=-1)
    chosen = torch.topk(probs, k).indices.reshape(-1)
    counts = torch.zeros(probs.shape[-1]).scatter_add_(0, chosen, torch.ones(chosen.numel()))
    return counts, probs.sum(0)


def test_aux_loss_formulas(parity):
    """The load-balancing losses differ as documented in pretrain/models/qwen2/state_dict.py: megatron, per layer,
    E / (T^2 k) * sum_e count_e prob_e (then summed over layers); HF, once over all layers concatenated,
    E / (T L)^2 * sum_e count_e prob_e (no 1/k)."""
    ref = parity["refs"]["moe"]
    E, k, T, L = 4, 2, B * S, len(ref["router_logits"])
    per_layer, total_counts, total_probs = [], torch.zeros(E), torch.zeros(E)
    for logits in ref["router_logits"]:
        counts, probs = _counts_probs(logits, k)
        per_layer.append((E / (T * T * k) * (counts * probs).sum()).item())
        total_counts += counts
        total_probs += probs
    megatron = parity["moe-tp1"]["aux_per_layer"]
    assert megatron == pytest.approx(per_layer, rel=1e-5)
    assert ref["hf_aux"] == pytest.approx((E / (T * L) ** 2 * (total_counts * total_probs).sum()).item(), rel=1e-5)
    assert sum(megatron) != pytest.approx(ref["hf_aux"], rel=1e-2)  # the same coefficient is not the same loss


# --------------------------------------------------------------------------------------------------
# Export: checkpoints written above -> HF dirs, compared with the originals
# --------------------------------------------------------------------------------------------------
def _assert_same_hf(exported: Path, original: Path) -> None:
    from pretrain.models.hf import HFCheckpoint, model_config_from_hf

    a, b = HFCheckpoint(exported), HFCheckpoint(original)
    assert sorted(a) == sorted(b)
    for key in b:
        ta, tb = a[key], b[key]
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), key
    strip = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k != "name"}  # noqa: E731
    assert strip(model_config_from_hf(a.config)) == strip(model_config_from_hf(b.config))


def test_export_model_checkpoint_loads_in_transformers(parity, hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrain.convert import export_checkpoint

    out = export_checkpoint(parity["out_root"] / "ckpt-dense-tp2", tmp_path / "hf")
    _assert_same_hf(out, hf_dirs["dense"])
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ref = parity["refs"]["dense"]
    with torch.no_grad():
        assert torch.equal(model(ref["tokens"]).logits, ref["logits"])


def test_export_cli_moe_saved_under_tp2_ep2(parity, hf_dirs, tmp_path):
    from pretrain.convert import main

    assert main(["export", "--checkpoint", str(parity["out_root"] / "ckpt-moe-tp2-ep2-etp1"),
                 "--out", str(tmp_path / "hf")]) == 0
    _assert_same_hf(tmp_path / "hf", hf_dirs["moe"])


def test_export_cli_qwen3_moe_saved_under_tp2_ep2(parity, hf_dirs, tmp_path):
    """A Qwen3-MoE checkpoint exports as Qwen3MoeForCausalLM (family from the saved model config), bit-identical."""
    from pretrain.convert import main

    assert main(["export", "--checkpoint", str(parity["out_root"] / "ckpt-qwen3_moe-tp2-ep2-etp1"),
                 "--out", str(tmp_path / "hf")]) == 0
    _assert_same_hf(tmp_path / "hf", hf_dirs["qwen3_moe"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]


def test_export_trainer_checkpoint(parity, hf_dirs, tmp_path):
    """A Checkpointer checkpoint (with optimizer state); the model shape comes from the run's resolved_config.yaml."""
    from pretrain.convert import main
    from pretrain.models.hf import HFCheckpoint

    assert main(["export", "--checkpoint", str(parity["trainer_checkpoint"]), "--out", str(tmp_path / "hf")]) == 0
    exported, trained, original = HFCheckpoint(tmp_path / "hf"), parity["trained"], HFCheckpoint(hf_dirs["dense"])
    assert sorted(exported) == sorted(trained) == sorted(original)
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert not torch.equal(exported["model.norm.weight"], original["model.norm.weight"])  # it did train


def test_import_cli_then_export_drops_vocab_padding(parity, hf_dirs, tmp_path):
    from pretrain.convert import export_checkpoint, read_checkpoint_tensors

    assert read_checkpoint_tensors(parity["import_dir"])["embedding.word_embeddings.weight"].shape[0] == MEGATRON_VOCAB
    out = export_checkpoint(parity["import_dir"], tmp_path / "hf")
    _assert_same_hf(out, hf_dirs["dense_pad"])  # 250 rows, tied: no lm_head.weight
