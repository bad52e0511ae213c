"""What a user watches: offline wandb runs (read back with wandb's schema) and local Hydra sweeps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.testing import read_wandb_history, write_learnable_shards

REPO = Path(__file__).resolve().parents[2]
FAST = ["trainer.log_every=1", "data.seq_len=64", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
        "trainer.plot_loss=false"]


def pretrain(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the config decides the mode
    proc = subprocess.run([sys.executable, "-m", "pretrain", *args, *FAST], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.timeout(600)
def test_offline_wandb_run_holds_every_logged_metric(tmp_path):
    shards = write_learnable_shards(tmp_path / "shards", vocab_size=256)
    run_dir = tmp_path / "run"
    pretrain(tmp_path, f"data.paths=[{shards}]", f"hydra.run.dir={run_dir}", "model=qwen2_moe_tiny",
             "parallel=ep2", "trainer.steps=3", "trainer.wandb.mode=offline")
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    history = read_wandb_history(run_files[0])
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["_step"] for row in history] == [1, 2, 3]
    for logged, written in zip(history, jsonl):
        assert logged["loss"] == written["loss"] and logged["lr"] == written["lr"]
        for key in ("grad_norm", "tokens_per_s", "peak_mem_gib", "skipped_steps", "moe/load_balancing_loss",
                    "moe/load_imbalance"):
            assert key in logged, key
        # tokens routed per expert: 4 experts, top-2 → every token counted twice per layer, 4 layers
        assert logged["moe/expert_tokens/_type"] == "histogram"  # wandb stores nested keys joined by "/"
        assert len(logged["moe/expert_tokens/values"]) == 4
        assert sum(logged["moe/expert_tokens/values"]) == 8 * 64 * 2 * 4
    assert (run_dir / "wandb_id").read_text() in run_files[0].name


@pytest.mark.timeout(600)
def test_local_multirun_sweep_gives_each_run_its_own_directory(tmp_path):
    shards = write_learnable_shards(tmp_path / "shards", vocab_size=256)
    pretrain(tmp_path, "-m", f"data.paths=[{shards}]", "parallel=single", "trainer.steps=2",
             "trainer.wandb.mode=disabled", "optim.lr=1e-3,2e-3", "trainer.run_name=sweep")
    runs = sorted((tmp_path / "multirun" / "sweep").iterdir())
    assert [r.name for r in runs if r.is_dir() and r.name.isdigit()] == ["0", "1"]
    lrs = []
    for run in (tmp_path / "multirun" / "sweep" / "0", tmp_path / "multirun" / "sweep" / "1"):
        config = yaml.safe_load((run / "resolved_config.yaml").read_text())
        lrs.append(config["optim"]["lr"])
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
        assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert lrs == [1e-3, 2e-3]


@pytest.mark.timeout(600)
def test_a_run_log_on_a_full_disk_is_reported_once_and_training_goes_on(tmp_path):
    """/dev/full refuses every write with ENOSPC, as a full disk does: one stderr line for the run log, then
    nothing more about it (not a `--- Logging error ---` block per record), and the run trains and saves."""
    shards = write_learnable_shards(tmp_path / "shards", vocab_size=256)
    run_dir = tmp_path / "run"
    proc = pretrain(tmp_path, f"data.paths=[{shards}]", f"hydra.run.dir={run_dir}", "parallel=single",
                    "trainer.steps=3", "trainer.wandb.mode=disabled", "hydra.job_logging.handlers.file.filename=/dev/full")
    reports = [line for line in proc.stderr.splitlines() if line.startswith("logging: ")]
    assert reports == ["logging: cannot write to /dev/full ([Errno 28] No space left on device); "
                       "no further lines go there"], proc.stderr[-3000:]
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    assert "step     3/3" in proc.stdout  # the console handler goes on
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"


@pytest.mark.timeout(600)
def test_eval_by_position_and_at_start_reach_metrics_wandb_console_and_plot(tmp_path):
    """trainer.eval_position_buckets + eval_at_start: a step-0 evaluation row (no training figures) and one per
    evaluation, the same numbers in metrics.jsonl and wandb, the buckets on the console, and the loss curve drawn."""
    shards = write_learnable_shards(tmp_path / "shards", vocab_size=256)
    run_dir = tmp_path / "run"
    proc = pretrain(tmp_path, f"data.paths=[{shards}]", f"hydra.run.dir={run_dir}", "parallel=single",
                    "trainer.steps=2", "trainer.eval_every=2", "trainer.eval_steps=1", "trainer.wandb.mode=offline",
                    "trainer.eval_position_buckets=2", "trainer.eval_at_start=true")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "loss" not in rows[0]
    keys = ["eval/loss_pos_0_32", "eval/loss_pos_32_64"]
    for row in (rows[0], rows[2]):
        assert all(k in row for k in keys)
        # every bucket holds the same number of tokens here (no loss mask): the buckets' mean is the eval loss
        assert sum(row[k] for k in keys) / 2 == pytest.approx(row["eval/loss"], rel=1e-6)
    history = read_wandb_history(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    by_step = {h["_step"]: h for h in history}
    assert by_step[0]["eval/loss_pos_32_64"] == rows[0]["eval/loss_pos_32_64"]
    assert by_step[2]["eval/loss_pos_0_32"] == rows[2]["eval/loss_pos_0_32"]
    log = proc.stdout + proc.stderr
    assert "eval      0/2" in log and "by position 0:" in log and " 32:" in log
    from pretrain.callbacks import plot_loss_curve  # FAST turns the plot off: draw it from this file here

    plot_loss_curve(run_dir / "metrics.jsonl", tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
