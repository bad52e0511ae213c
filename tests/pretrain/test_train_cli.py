"""The training CLI end to end on CPU: `python -m pretrain` starts its own gloo processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.testing import write_learnable_shards

REPO = Path(__file__).resolve().parents[2]


def train(run_dir: Path, data_dir: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "pretrain", f"data.paths=[{data_dir}]", f"hydra.run.dir={run_dir}",
           "trainer.wandb.mode=disabled", "trainer.log_every=5", "data.seq_len=64", "optim.warmup_steps=2",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_learnable_shards(tmp_path_factory.mktemp("shards"), vocab_size=256)


@pytest.mark.timeout(600)
def test_tp2_equals_tp1_and_loss_decreases(tmp_path, shards):
    steps = ["trainer.steps=12", "trainer.global_batch_size=8", "trainer.micro_batch_size=4"]
    tp1 = train(tmp_path / "tp1", shards, "parallel=single", *steps)
    tp2 = train(tmp_path / "tp2", shards, "parallel=tp2", *steps)

    assert [r["step"] for r in tp2] == list(range(1, 13))
    for a, b in zip(tp1, tp2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    assert tp2[-1]["loss"] < tp2[0]["loss"] - 0.5  # learnable data: 5.57 -> 4.79 measured

    run = tmp_path / "tp2"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert (run / "checkpoints" / "step_00000012" / "metadata.json").is_file()
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "resolved_config.yaml").is_file()


def test_bad_layout_is_one_clear_message(tmp_path, shards):
    cmd = [sys.executable, "-m", "pretrain", f"data.paths=[{shards}]", f"hydra.run.dir={tmp_path}",
           "parallel.tp=3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WORLD_SIZE": "3"})
    assert proc.returncode == 2
    assert "config error: parallel.tp=3 does not divide the model's 4 attention heads" in proc.stderr
    assert "Traceback" not in proc.stderr
