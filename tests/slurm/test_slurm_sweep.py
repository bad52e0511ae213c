"""A Hydra multirun through hydra-submitit-launcher: a 2-job array on the local cluster, both results back."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slurm
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher==1.2.0")


@pytest.mark.timeout(500)
def test_lr_sweep_runs_as_a_job_array(slurm, shards, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "pretrain", "-m", "cluster=slurm", "cluster.time_min=10", "optim.lr=1e-3,2e-3",
           f"hydra.sweep.dir={sweep}", f"data.paths=[{shards}]", "model=qwen2_tiny", "parallel=single",
           "data.seq_len=64", "trainer.steps=3", "trainer.log_every=1", "trainer.wandb.mode=disabled",
           "trainer.plot_loss=false"]
    proc = subprocess.run(cmd, cwd=slurm.repo, capture_output=True, text=True, timeout=480,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    logs = "".join(p.read_text()[-3000:] for p in sweep.glob(".submitit/*/*.out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs

    for num, lr in ((0, 1e-3), (1, 2e-3)):
        run = sweep / str(num)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
        config = yaml.safe_load((run / "resolved_config.yaml").read_text())
        assert config["optim"]["lr"] == lr
        # The names the point ran with, not the sweep's: run name "<sweep run name>-<num>", group the sweep's.
        assert (config["trainer"]["run_name"], config["trainer"]["wandb"]["group"]) == (f"default-{num}", "default")
    # One array of two tasks, its allocation taken from the cluster group.
    (sbatch_file,) = {p.read_text() for p in sweep.glob(".submitit/*/*_submission.sh")} or {""}
    assert "#SBATCH --array=0-1" in sbatch_file, sbatch_file
    assert "#SBATCH --time=10" in sbatch_file and "#SBATCH --cpus-per-task=2" in sbatch_file
