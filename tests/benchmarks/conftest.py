"""The GPU script's CPU rehearsal (``benchmarks/gpu/run.sh`` with DRY_RUN=1), shared by the tests that read it.

It is a couple of minutes of single-process steps one after another, so it runs in the background: started by
test_gpu_script_dry_run.py's tests, or earlier, when those are selected too, by the benchmarks of
test_bench_data_smoke.py and test_bench_dry_run.py (``rehearsal_alongside``), which leave a core idle much of
their time. Its output goes to files (a pipe nobody reads while the other tests run would fill and stall it).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def gpu_rehearsal(tmp_path_factory) -> tuple[Path, subprocess.Popen]:
    """(its $OUT folder, the running ``bash benchmarks/gpu/run.sh``); its stdout and stderr next to $OUT, in
    run.sh.stdout and run.sh.stderr."""
    out = tmp_path_factory.mktemp("gpu_rehearsal") / "out"
    out.mkdir()
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    with open(out.parent / "run.sh.stdout", "w") as stdout, open(out.parent / "run.sh.stderr", "w") as stderr:
        proc = subprocess.Popen(["bash", "benchmarks/gpu/run.sh"], cwd=REPO, env=env, stdout=stdout,
                                stderr=stderr, text=True, start_new_session=True)
    yield out, proc
    if proc.poll() is None:  # its tests did not wait for it (deselected or failed early): stop it and its steps
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def rehearsal_alongside(request) -> None:
    """Starts the rehearsal now if its tests are selected (requested by a fixture about to start its benchmarks)."""
    if any(item.path.name == "test_gpu_script_dry_run.py" for item in request.session.items):
        request.getfixturevalue("gpu_rehearsal")
