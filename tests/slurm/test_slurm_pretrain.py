"""slurm/pretrain.sh on the local cluster: a TP2 run, preemption (USR1) and the time limit, both requeued."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

TINY = ["model=qwen2_tiny", "parallel=tp2", "data.seq_len=64", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4", "trainer.log_every=1", "trainer.wandb.mode=disabled",
        "trainer.plot_loss=false"]


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_steps(run_dir: Path, n: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while len(steps_logged(run_dir)) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {n} steps after {timeout:.0f} s\n" + (log.read_text()[-4000:] if log.exists() else ""))
        time.sleep(0.5)


def restarts(run_dir: Path) -> list[tuple[int, int]]:
    """(restart count, checkpoint step at start) of each start, from the script's slurm_jobs.log."""
    text = (run_dir / "slurm_jobs.log").read_text()
    return [(int(r), int(s)) for r, s in re.findall(r"restart (\d+) .*from step (\d+)", text)]


@pytest.mark.timeout(400)
def test_tp2_on_two_gpus_per_node_completes_with_a_checkpoint(slurm, shards, tmp_path):
    # The node's placeholder GPUs make this the GPU path: ranks per node = GPUs Slurm allocated.
    job = slurm.submit("--time=10", f"--gpus-per-node={slurm.fake_gpus}", "slurm/pretrain.sh", *TINY,
                       f"data.paths=[{shards}]", "trainer.steps=6", "trainer.run_name=tp2",
                       env={"RUNS_DIR": str(tmp_path)})
    run = tmp_path / "tp2"
    log = run / f"slurm-{job}.out"
    info = slurm.wait(job, timeout=360, log=log)

    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["ExitCode"] == "0:0"
    assert f"1 node(s) x {slurm.fake_gpus} ranks" in text
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (run / "checkpoints" / "step_00000006").is_dir()
    assert restarts(run) == [(0, 0)]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("scancel", [["--batch"], []], ids=["batch", "steps"])
def test_preempted_job_saves_requeues_and_resumes(slurm, shards, tmp_path, scancel):
    # What --signal=B:USR1@<margin> does before the time limit, sent by hand: deterministic and quick.
    # Without --batch the signal reaches the training processes only; the job must requeue all the same.
    job = slurm.submit("--time=10", "slurm/pretrain.sh", *TINY, f"data.paths=[{shards}]", "trainer.steps=60",
                       env={"RUNS_DIR": str(tmp_path), "RUN_NAME": "preempted"})
    run = tmp_path / "preempted"
    log = run / f"slurm-{job}.out"
    wait_for_steps(run, 3, timeout=300, log=log)
    subprocess.run(["scancel", "--signal=USR1", *scancel, job], check=True, timeout=30)

    info = slurm.wait(job, lambda i: i.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"},
                      timeout=360, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == "1"
    (first, _), (second, resumed_at) = restarts(run)
    assert (first, second) == (0, 1)
    assert 3 <= resumed_at < 60, resumed_at
    assert f"checkpoint at step {resumed_at} of 60: requeueing job {job}" in text
    # Every step exactly once: the first run logged 1..resumed_at, the restart resumed_at+1..60.
    assert steps_logged(run) == list(range(1, 61))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000060"


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_time_limit_signal_requeues_and_resumes(slurm, shards, tmp_path):
    # --time=3 with a 100 s margin: the signal is due 80 s after the start. Slurm checks time limits
    # about every 30 s, so it comes up to ~30 s early or late: after startup either way, and with
    # a minute left for the save.
    job = slurm.submit("--time=3", "--signal=B:USR1@100", "slurm/pretrain.sh", *TINY, f"data.paths=[{shards}]",
                       "trainer.steps=100000", "trainer.run_name=timelimit", env={"RUNS_DIR": str(tmp_path)})
    run = tmp_path / "timelimit"
    log = run / f"slurm-{job}.out"
    ended = {"FAILED", "CANCELLED", "TIMEOUT", "COMPLETED"}

    info = slurm.wait(job, lambda i: i.get("Restarts") == "1" or i.get("JobState") in ended, timeout=300, log=log)
    assert info["Restarts"] == "1", log.read_text()[-4000:]
    # The restart would meet the same limit: give it time to show that it resumes and trains on.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True, timeout=30)

    def resumed_and_trained(info: dict) -> bool:
        starts = restarts(run) if (run / "slurm_jobs.log").exists() else []
        return info.get("JobState") in ended or (len(starts) == 2 and steps_logged(run)[-1:] > [starts[1][1]])

    info = slurm.wait(job, resumed_and_trained, timeout=180, log=log)
    subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert info["JobState"] in {"RUNNING", "COMPLETING"}, text[-4000:]
    (_, _), (_, resumed_at) = restarts(run)
    assert resumed_at > 0
    assert f"checkpoint at step {resumed_at} of 100000: requeueing job {job}" in text
    logged = steps_logged(run)
    assert logged == list(range(1, len(logged) + 1)) and len(logged) > resumed_at
