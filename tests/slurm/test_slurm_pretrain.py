"""slurm/pretrain.sh on the local cluster: a TP2 run, preemption (USR1) and the time limit, both requeued.

The TP2 run and the two preempted runs are submitted together (``runs``) and run side by side; the time-limit
test, which mostly waits for Slurm's clock, comes first and lets them start while it waits.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
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


def restarts(run_dir: Path) -> list[tuple[int, int]]:
    """(restart count, checkpoint step at start) of each start, from the script's slurm_jobs.log."""
    text = (run_dir / "slurm_jobs.log").read_text()
    return [(int(r), int(s)) for r, s in re.findall(r"restart (\d+) .*from step (\d+)", text)]


@dataclass
class Submitted:
    job: str
    run: Path  # the run directory
    log: Path  # the Slurm log


@pytest.fixture(scope="module")
def runs(module_slurm, shards, tmp_path_factory) -> dict[str, Submitted]:
    """The TP2 run and both preempted runs, submitted together; each preempted run gets its SIGUSR1 after 3 steps:
    to the batch shell (``--batch``, what --signal=B:USR1@<margin> does before the time limit, sent by hand:
    deterministic and quick), or to the training processes only (no ``--batch``)."""
    slurm, root = module_slurm, tmp_path_factory.mktemp("pretrain_runs")

    def submit(name: str, *args: str, env: dict[str, str]) -> Submitted:
        job = slurm.submit(*args, env={"RUNS_DIR": str(root / name), **env})
        run = root / name / (env.get("RUN_NAME") or "tp2")
        return Submitted(job, run, run / f"slurm-{job}.out")

    # The node's placeholder GPUs make this the GPU path: ranks per node = GPUs Slurm allocated.
    out = {"tp2": submit("tp2", "--time=10", f"--gpus-per-node={slurm.fake_gpus}", "slurm/pretrain.sh", *TINY,
                         f"data.paths=[{shards}]", "trainer.steps=6", "trainer.run_name=tp2", env={})}
    signals = {"batch": ["--batch"], "steps": []}
    for name in signals:
        out[name] = submit(name, "--time=10", "slurm/pretrain.sh", *TINY, f"data.paths=[{shards}]", "trainer.steps=60",
                           env={"RUN_NAME": "preempted"})
    deadline = time.monotonic() + 300
    while signals:
        for name in [n for n in signals if len(steps_logged(out[n].run)) >= 3]:
            subprocess.run(["scancel", "--signal=USR1", *signals.pop(name), out[name].job], check=True, timeout=30)
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than 3 steps after 300 s: {sorted(signals)}\n" +
                        "".join(out[n].log.read_text()[-2000:] for n in signals if out[n].log.exists()))
        time.sleep(0.5)
    return out


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_time_limit_signal_requeues_and_resumes(slurm, shards, tmp_path, request):
    # --time=3 with a 100 s margin: the signal is due 80 s after the start. Slurm checks time limits
    # about every 30 s, so it comes up to ~30 s early or late: after startup either way, and with
    # a minute left for the save.
    job = slurm.submit("--time=3", "--signal=B:USR1@100", "slurm/pretrain.sh", *TINY, f"data.paths=[{shards}]",
                       "trainer.steps=100000", "trainer.run_name=timelimit", env={"RUNS_DIR": str(tmp_path)})
    if any(item.module is request.module and "runs" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("runs")  # the other tests' jobs run while this one waits for Slurm's clock
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


@pytest.mark.timeout(400)
def test_tp2_on_two_gpus_per_node_completes_with_a_checkpoint(module_slurm, runs):
    job, run, log = runs["tp2"].job, runs["tp2"].run, runs["tp2"].log
    info = module_slurm.wait(job, timeout=360, log=log)

    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["ExitCode"] == "0:0"
    assert f"1 node(s) x {module_slurm.fake_gpus} ranks" in text
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (run / "checkpoints" / "step_00000006").is_dir()
    assert restarts(run) == [(0, 0)]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("scancel", ["batch", "steps"])
def test_preempted_job_saves_requeues_and_resumes(module_slurm, runs, scancel):
    # Without --batch the signal reaches the training processes only; the job must requeue all the same.
    job, run, log = runs[scancel].job, runs[scancel].run, runs[scancel].log
    info = module_slurm.wait(job, lambda i: i.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"},
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
