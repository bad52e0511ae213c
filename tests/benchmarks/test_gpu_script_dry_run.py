"""``benchmarks/gpu/run.sh`` rehearsed on the CPU (``DRY_RUN=1``: tiny shapes, gloo, fp32/bf16 on the CPU), and
its correctness gates on made-up documents. The GPU call must not waste its one lease: every phase runs here
first, in order, and leaves its file in $OUT. No timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

import gates  # noqa: E402


@pytest.fixture(scope="module")
def rehearsal(gpu_rehearsal) -> tuple[Path, subprocess.CompletedProcess]:
    """The rehearsal (conftest.py: it may have started earlier, in the background), finished."""
    out, proc = gpu_rehearsal
    proc.wait(timeout=3000)
    stdout, stderr = ((out.parent / f"run.sh.{name}").read_text() for name in ("stdout", "stderr"))
    return out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_every_phase_ran_and_wrote_its_file(rehearsal):
    out, proc = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = (out / "env.txt").read_text()
    assert "date " in env and "command: bash benchmarks/gpu/run.sh" in env and "torch" in env
    pre = json.loads((out / "preflight.json").read_text())
    assert pre["collective"]["ok"] and pre["collective"]["backend"] == "gloo"
    assert set(pre["sdpa"]) == {"qwen2_1_5b", "qwen1_5_moe_a2_7b", "qwen2_0_5b"}
    assert all(row["auto"] for row in pre["sdpa"].values())  # the backend torch picked, read from the profiler
    assert pre["matmul"]["tflops"] > 0
    assert gates.check_fp32(json.loads((out / "gate_fp32.json").read_text())) == ""
    assert gates.check_bf16(json.loads((out / "gate_bf16.json").read_text())) == ""
    log = (out / "run.log").read_text()
    assert "gate fp32: pass" in log and "gate bf16: pass" in log
    # Timed runs in order, headline first; each one's result line written by its own process.
    docs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert docs, log[-3000:]
    assert docs[0]["config"]["model"] == "qwen2_tiny" and docs[0]["config"]["peer"] == "hf"  # the 1.5B's stand-in
    order = [line.split()[2].rstrip(":") for line in log.splitlines() if "=== " in line and ": exit" in line]
    assert order[:3] == ["gate_fp32", "gate_bf16", "headline_qwen2_1_5b"], order
    for doc in docs:
        assert doc["config"]["dry_run"] and "kernels" in doc["config"]
        for side in doc["results"].values():
            assert "error" not in side, side.get("error")
            assert side["mfu"] is None and side["mfu_causal"] is None  # no GPU peak: n/a, never a made-up number
            assert side["matmul_fraction"] > 0  # of the ceiling preflight measured in the same run
    moe = [d for d in docs if d["config"]["model"] == "qwen2_moe_tiny"]
    assert moe and all("attention_kernels" not in s for d in moe for s in d["results"].values())  # no profiler
    rows = (out / "results_rows.md").read_text()
    assert rows.count("DRY RUN") == len(docs)
    assert "ratio ours/peer" in log and "run.sh: done" in log


def _doc(precision: str, ours: list[float], peer: list[float]) -> dict:
    return {"config": {"precision": precision},
            "results": {"ours": {"loss_step0": ours[0], "losses": ours}, "peer": {"loss_step0": peer[0], "losses": peer}}}


def test_gates():
    assert gates.check_fp32(_doc("fp32", [11.93], [11.93005])) == ""
    assert "> 0.0001" in gates.check_fp32(_doc("fp32", [11.93], [11.9302]))
    assert gates.check_fp32(_doc("fp32", [float("nan")], [11.93]))  # NaN never passes
    assert "fp32 gate on a bf16 run" in gates.check_fp32(_doc("bf16", [1.0], [1.0]))
    assert gates.check_bf16(_doc("bf16", [12.0, 11.5, 11.0], [12.01, 11.49, 11.01])) == ""
    assert "apart" in gates.check_bf16(_doc("bf16", [12.0, 11.5, 11.0], [12.0, 11.5, 11.1]))
    assert "did not fall" in gates.check_bf16(_doc("bf16", [12.0, 12.1, 12.2], [12.0, 12.1, 12.2]))
    failed = {"config": {"precision": "fp32"}, "results": {"ours": {"error": "OOM: ..."}, "peer": {}}}
    assert "ours did not run" in gates.check_fp32(failed)
