"""``benchmarks/bench_throughput.py --dry-run``: the GPU throughput benchmark's plumbing, on the CPU.

The dry run builds this project's training step (megatron-core, as ``build_train_module`` builds it) and
the Hugging Face peer from the same weights, runs 3 steps of each on one batch, and reports JSON. No
timing is asserted: only that both sides ran (finite positive tokens/s) and that they computed the same
step-0 loss in fp32 -- which is what makes the ours/peer ratio on the GPU an apples-to-apples comparison.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_throughput.py"

# name -> extra arguments. Each runs in its own process, all at once (imports dominate their wall time).
RUNS = {
    "dense": ["--model", "qwen2_tiny"],
    "moe": ["--model", "qwen2_moe_tiny"],
    # The GPU's bf16 code paths (Float16Module, bf16 peer with fp32 master weights), run on the CPU.
    "dense_bf16": ["--model", "qwen2_tiny", "--precision", "bf16", "--no-profile"],
    # The real preset's shape (151,936-word vocabulary, tied embeddings), cut to 2 layers: what the GPU runs.
    "real_0_5b": ["--model", "qwen2_0_5b", "--keep-preset", "--layers", "2", "--seq-len", "64", "--no-profile"],
}


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory, rehearsal_alongside) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    procs = {}
    for name, extra in RUNS.items():
        path = out / f"{name}.json"
        cmd = [sys.executable, str(SCRIPT), "--dry-run", "--json", str(path), *extra]
        procs[name] = (path, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
    docs = {}
    for name, (path, proc) in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{output[-4000:]}"
        docs[name] = json.loads(path.read_text())
        docs[name]["_stdout"] = output
    return docs


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_both_sides_ran_and_agree_on_step0_loss(dry_runs, name):
    doc = dry_runs[name]
    assert doc["config"]["dry_run"] and doc["config"]["precision"] == "fp32"
    assert doc["config"]["model"] == RUNS[name][1]
    ours, peer = doc["results"]["ours"], doc["results"]["peer"]
    for side in (ours, peer):
        assert "error" not in side, side.get("error")
        assert math.isfinite(side["tokens_per_s"]) and side["tokens_per_s"] > 0
        assert len(side["step_s_all"]) == doc["config"]["steps"]
        assert len(side["losses"]) == doc["config"]["steps"] + doc["config"]["warmup"]
        assert all(math.isfinite(x) for x in side["losses"])
        assert side["mfu"] is None  # no GPU peak on the CPU: reported as n/a, never a made-up number
        # Both sides went through torch SDPA (the op the GPU dispatches to flash/cuDNN kernels).
        assert any("scaled_dot_product" in k for k in side["attention_kernels"]), side["attention_kernels"]
    assert peer["weights"] == "same as ours"
    assert ours["freed"]  # torn down before the peer ran: on the GPU its memory would count in the peer's
    # Same weights, same batch, fp32: the losses before any update are the same computation.
    assert abs(ours["loss_step0"] - peer["loss_step0"]) < 1e-4, (ours["loss_step0"], peer["loss_step0"])
    if name == "dense":
        # ...and the same optimizer (lr, betas, eps, weight decay groups, clipping): the same trajectory.
        # (MoE: the two load-balancing losses differ by design, so only step 0 matches.)
        assert all(abs(a - b) < 1e-4 for a, b in zip(ours["losses"], peer["losses"])), (ours["losses"],
                                                                                       peer["losses"])
    assert doc["ratio_tokens_per_s_ours_over_peer"] > 0
    assert doc["flops_per_token"] > 0 and doc["params"]["active"] <= doc["params"]["total"]
    if name == "moe":
        assert doc["params"]["active"] < doc["params"]["total"]
        assert peer["impl"].split()[2] == "Qwen2MoeForCausalLM"


def test_bf16_code_path(dry_runs):
    doc = dry_runs["dense_bf16"]
    assert doc["config"]["precision"] == "bf16" and doc["config"]["peer_precision"] == "master"
    ours, peer = doc["results"]["ours"], doc["results"]["peer"]
    assert ours["config"]["bf16"] and ours["config"]["params_dtype"] == "torch.bfloat16"
    for side in (ours, peer):
        assert math.isfinite(side["tokens_per_s"]) and side["tokens_per_s"] > 0
    assert ours["freed"]
    assert abs(ours["loss_step0"] - peer["loss_step0"]) < 1e-2


def test_table_printed(dry_runs):
    out = dry_runs["dense"]["_stdout"]
    assert "ratio ours/peer tokens/s" in out and "n/a" in out


def _bench_module():
    import benchmarks.bench_throughput as bench

    return bench


def _doc(command: str) -> dict:
    side = dict(tokens_per_s=1000.0, mfu=0.42, peak_memory_gib=10.0)
    return {"date": "2026-01-01T00:00:00+00:00", "command": command, "config": {"dry_run": False},
            "machine": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "transformers": "5.17"},
            "results": {"ours": dict(side), "peer": dict(side, tokens_per_s=800.0)},
            "ratio_tokens_per_s_ours_over_peer": 1.25}


def test_record_appends_only(tmp_path):
    bench = _bench_module()
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## someone else's section\n\n| a |\n|---|\n| 1 |\n")
    before = path.read_text()
    bench.record_row(_doc("cmd one"), path)
    bench.record_row(_doc("cmd two"), path)
    text = path.read_text()
    assert text.startswith(before)  # nothing rewritten
    assert text.count("## bench_throughput") == 1  # second row under the same header
    assert text.rstrip().splitlines()[-1].startswith("| 2026-01-01 00:00 | NVIDIA H100 80GB HBM3 | `cmd two` | 1000 |")
    assert "| 42.0% |" in text and "| 1.25 |" in text
    # Another engineer appends a section: our next row gets a fresh header after theirs.
    with open(path, "a") as f:
        f.write("\n## later section\n\n| b |\n|---|\n| 2 |\n")
    bench.record_row(_doc("cmd three"), path)
    text = path.read_text()
    assert text.count("## bench_throughput") == 2
    assert text.index("## later section") < text.rindex("## bench_throughput") < text.index("cmd three")


def test_peak_table():
    bench = _bench_module()  # the table is pretrain.plan.hardware's (the trainer's MFU uses it too)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", None) == 989.4e12
    assert bench.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert bench.peak_flops("NVIDIA H200", None) == 989.4e12
    assert bench.peak_flops("Some Future GPU", None) is None
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", 500) == 500e12
    assert bench.peak_flops(None, None) is None  # the CPU


def test_command_line_drops_where_results_went():
    bench = _bench_module()
    argv = ["--model", "qwen2_0_5b", "--json", "--record", "--record-to", "x.md", "--json=out.json", "--steps", "5",
            "--json", "-", "--override", "trainer.compile=true"]
    assert bench.harness.command_line("bench_throughput.py", argv, bench.OUTPUT_OPTIONS) == (
        "python benchmarks/bench_throughput.py --model qwen2_0_5b --steps 5 --override trainer.compile=true")


def test_real_preset_shape(dry_runs):
    doc = dry_runs["real_0_5b"]
    c = doc["config"]
    assert c["model"] == "qwen2_0_5b" and c["layers"] == 2 and c["vocab_size"] == 151936
    ours, peer = doc["results"]["ours"], doc["results"]["peer"]
    assert ours["freed"] and peer["weights"] == "same as ours"  # tied: one embedding, converted and loaded
    # ln(151936) = 11.93: an untrained model's loss sits near it, the same on both sides.
    assert abs(ours["loss_step0"] - 11.93) < 0.5
    assert all(abs(a - b) < 1e-4 for a, b in zip(ours["losses"], peer["losses"])), (ours["losses"], peer["losses"])
    # Both MFU conventions are computed from the same shape: the causal one discounts half the attention term.
    from pretrain.models.decoder.flops import flops_per_token  # noqa: F401 - importable without a GPU
    m = 2 * 14 * 64 * 64  # layers * heads * head_dim * seq
    assert doc["flops_per_token"] - doc["flops_per_token_causal"] == pytest.approx(6 * m)
