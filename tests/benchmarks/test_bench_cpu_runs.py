"""The CPU benchmarks run end to end on tiny shapes, through the shared harness (no timing asserted).

* ``benchmarks.harness.job`` composes and checks a job as ``python -m pretrain`` does;
* ``bench_model_step`` (run as ``python -m benchmarks.bench_model_step``): ours and transformers hold the same
  weights, so their step-0 losses agree;
* ``bench_zero_memory`` counts with ``pretrain.plan.measure``: ZeRO-0 holds 4Ψ of weights and 4Ψ of gradients,
  ZeRO-3 a 1/dp share of each, to the byte;
* ``bench_planner_published``: one row per published run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_job_is_composed_and_checked_as_the_trainer_does():
    from benchmarks.harness import job

    composed = job(["model=qwen2_tiny", "parallel=single", "model.vocab_size=512"], model={"num_layers": 2})
    assert composed.model.name == "qwen2_tiny" and composed.model.num_layers == 2 and composed.model.vocab_size == 512
    assert job(["parallel=single"], model=lambda m: {"max_seq_len": 2 * m.max_seq_len}).model.max_seq_len == 2048
    with pytest.raises(ConfigError, match="nonsense"):  # common.cli.to_object: unknown keys refused
        job(["parallel=single", "+trainer.nonsense=1"])
    with pytest.raises(ConfigError):  # validate_job: tp=2 on one process
        job(["parallel=tp2"], world_size=1)


def test_write_json_appends_jsonl(tmp_path):
    from benchmarks.harness import write_json

    out = tmp_path / "runs.jsonl"
    write_json({"a": 1}, str(out))
    write_json({"b": Path("x")}, str(out))  # default=str: a Path is written as its text
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"a": 1}, {"b": "x"}]


def test_model_step_same_weights_same_loss(tmp_path):
    out = tmp_path / "step.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_model_step", "--models", "qwen2_tiny", "--steps", "1",
                           "--warmup", "0", "--seq-len", "32", "--batch-size", "1", "--vocab-size", "512",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "first loss (mcore / HF)" in proc.stdout  # the table, since the JSON went to a file
    (result,) = json.loads(out.read_text())["results"]
    assert result["model"] == "qwen2_tiny" and result["megatron_step_s"] > 0
    loss = result["loss_first"]
    assert loss["megatron"] == pytest.approx(loss["transformers"], abs=1e-5)


def test_zero_memory_counts_model_state_exactly():
    pytest.importorskip("deepspeed")
    import benchmarks.bench_zero_memory as bench
    from parallel.testing import run_distributed

    args = argparse.Namespace(layers=1, hidden=64, vocab=512, seq=16)
    for zero in (0, 3):
        ranks = run_distributed(bench.run_stage, 2, args, [zero], timeout=300)
        for r in ranks:
            psi, b = r[zero]["params"], r[zero]["bytes"]
            assert set(b) == {"params", "grads", "master", "adam", "buckets", "other"}
            share = 1 if zero == 0 else 2  # ZeRO-3 shards weights and gradients over dp = 2
            assert b["params"] == b["grads"] == 4 * psi // share, (zero, psi, b)
            assert 8 * psi // share <= b["adam"] < 8 * psi // share + 1024, (zero, b)  # + Adam's step counters
            # DeepSpeed's fp32 partition is a copy even for an fp32 model; megatron's is the weights themselves
            assert b["master"] == (4 * psi // 2 if zero == 3 else 0), (zero, b)


def test_planner_published_rows(capsys):
    import benchmarks.bench_planner_published as bench

    assert bench.main([]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| llama")]
    assert len(rows) == len(bench.ROWS) == 9
    assert f"over {len(bench.ROWS)} published runs" in out
