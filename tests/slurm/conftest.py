"""Real Slurm clusters for the tests in this folder, started by slurm/cluster/up.sh: the one-node cluster
(``slurm``) and the simulated 3-node cluster of ``up.sh --nodes 3`` (``multinode``), whose commands run
inside node 1 through slurm/cluster/node.sh.

The clusters stay up after the tests (up.sh is idempotent: the next session finds them in about a
second); slurm/cluster/down.sh [--nodes 3] stops them. Jobs wait on `scontrol show job -o` (no accounting here).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.testing import write_learnable_shards

REPO = Path(__file__).resolve().parents[2]
FAKE_GPUS = 2
MULTINODE_NODES = 3  # test_multinode.py: jobs on mn1-mn2, the node failure drills on mn1 + mn3
NODE_SH = REPO / "slurm" / "cluster" / "node.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def start_cluster(*options: str) -> None:
    """slurm/cluster/up.sh with ``options``; skips only where Slurm cannot run, fails otherwise."""
    up = REPO / "slurm" / "cluster" / "up.sh"
    try:
        proc = subprocess.run([str(up), *options], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"slurm/cluster/up.sh did not finish in 300 s: {exc.stdout!r} {exc.stderr!r}")
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-2000:]
        if shutil.which("sinfo") is None:
            pytest.skip(f"Slurm is not installed and slurm/cluster/up.sh could not install or start it: {output}")
        pytest.fail(f"slurm/cluster/up.sh {' '.join(options)} failed (exit {proc.returncode}): {output}")


@pytest.fixture(scope="session")
def slurm_cluster() -> int:
    """Start (or find) the local cluster; returns its number of placeholder GPUs."""
    start_cluster("--fake-gpus", str(FAKE_GPUS))
    return FAKE_GPUS


def job_info(job_id: str, prefix: tuple[str, ...] = ()) -> dict[str, str]:
    """`scontrol show job -o` as a dict (first line: the job itself, or an array's first task)."""
    out = subprocess.run([*prefix, "scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    line = out.splitlines()[0] if out.strip() else ""
    return dict(re.findall(r"(\w+)=(\S*)", line))


class Slurm:
    """Submits through slurm/submit.sh from the repository root and cancels what is left at the end.

    ``prefix`` runs every Slurm command through it (the multi-node cluster: node.sh 1); ``up_options`` are the
    options of the up.sh that started the cluster."""

    def __init__(self, fake_gpus: int = 0, prefix: tuple[str, ...] = (), up_options: tuple[str, ...] = ()) -> None:
        self.fake_gpus = fake_gpus
        self.prefix = prefix
        self.up_options = up_options
        self.repo = REPO
        self.jobs: list[str] = []

    def up(self, timeout: float = 120) -> subprocess.CompletedProcess:
        """slurm/cluster/up.sh again with this cluster's options: restarts nothing, brings a lost node back."""
        return subprocess.run([str(REPO / "slurm" / "cluster" / "up.sh"), *self.up_options], capture_output=True,
                              text=True, timeout=timeout)

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command (squeue, scancel, scontrol, ...) on this cluster."""
        return subprocess.run([*self.prefix, *cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def submit(self, *args: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run([*self.prefix, str(REPO / "slurm" / "submit.sh"), *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stdout.strip().splitlines()[-1]
        self.jobs.append(job_id)
        return job_id

    def wait(self, job_id: str, until=lambda info: info.get("JobState") in TERMINAL, *, timeout: float,
             log: Path | None = None) -> dict[str, str]:
        """Poll the job until ``until(info)`` holds; fail with the job's log tail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = job_info(job_id, self.prefix)
            if info and until(info):
                return info
            time.sleep(1)
        tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
        pytest.fail(f"job {job_id} not done after {timeout:.0f} s: {info.get('JobState')}\n{tail}")

    def cancel_all(self) -> None:
        if self.jobs:
            subprocess.run([*self.prefix, "scancel", *self.jobs], capture_output=True, timeout=30)


@pytest.fixture
def slurm(slurm_cluster) -> Slurm:
    jobs = Slurm(slurm_cluster)
    yield jobs
    jobs.cancel_all()


@pytest.fixture(scope="module")
def module_slurm(slurm_cluster) -> Slurm:
    """``slurm`` for the jobs a module's tests share."""
    jobs = Slurm(slurm_cluster)
    yield jobs
    jobs.cancel_all()


@pytest.fixture(scope="session")
def multinode() -> Slurm:
    """The simulated 3-node cluster (up.sh --nodes 3), shared by every multi-node test of the session."""
    options = ("--nodes", str(MULTINODE_NODES))
    start_cluster(*options)
    jobs = Slurm(prefix=(str(NODE_SH), "1"), up_options=options)
    yield jobs
    jobs.cancel_all()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return write_learnable_shards(tmp_path_factory.mktemp("slurm_shards"), vocab_size=256)
