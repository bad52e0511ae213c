"""The cluster scripts themselves: up.sh is idempotent; data_pipeline.sh passes overrides and requeues."""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm


@pytest.mark.timeout(120)
def test_up_is_idempotent_and_fast(slurm, slurm_cluster):
    start = time.monotonic()
    proc = subprocess.run([str(slurm.repo / "slurm/cluster/up.sh"), "--fake-gpus", str(slurm_cluster)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 10
    assert "starting" not in proc.stdout, proc.stdout  # nothing restarted
    assert re.search(r"node \S+ is (idle|mixed|allocated|completing)", proc.stdout), proc.stdout
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30).stdout
    assert f"gpu:{slurm_cluster}" in gres


STUB = """#!/usr/bin/env bash
# Stands in for python: records its arguments; the first run works until it is killed, the restart finishes.
echo "restart=${SLURM_RESTART_COUNT:-0} args=$*" >> "$STUB_LOG"
if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then
  while :; do sleep 0.2; done
fi
"""


@pytest.mark.timeout(200)
def test_data_pipeline_job_passes_overrides_and_requeues_when_signalled(slurm, tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    stub_log = tmp_path / "calls.log"
    job = slurm.submit("--time=10", "slurm/data_pipeline.sh", "data.name=tiny", "executor.workers=2",
                       env={"PYTHON": str(stub), "STUB_LOG": str(stub_log), "SLURM_LOG_DIR": str(tmp_path / "logs")})
    log = tmp_path / "logs" / f"data_pipeline-{job}.out"
    deadline = time.monotonic() + 120
    while not stub_log.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)

    info = slurm.wait(job, timeout=150, log=log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert info["Restarts"] == "1"
    assert "requeueing job" in log.read_text()
    assert stub_log.read_text().splitlines() == [
        "restart=0 args=-m data_pipeline data.name=tiny executor.workers=2",
        "restart=1 args=-m data_pipeline data.name=tiny executor.workers=2",
    ]


@pytest.mark.timeout(300)
def test_data_pipeline_job_writes_shards_and_manifest(slurm, tmp_path):
    from data_pipeline.testing import RULE_FILTERS, write_corpus

    write_corpus(tmp_path / "in.jsonl", good=20, exact_dups=2)
    out = tmp_path / "out"
    job = slurm.submit("--time=10", "--cpus-per-task=2", "slurm/data_pipeline.sh",
                       f"data_pipeline.input.paths=[{tmp_path / 'in.jsonl'}]", f"data_pipeline.output_dir={out}",
                       "data_pipeline.tokenizer.vocab_size=400", "data_pipeline.dedup.minhash.enabled=false",
                       "data_pipeline.progress=false",
                       *(f"data_pipeline.filters.{name}.enabled=false" for name in RULE_FILTERS),
                       env={"SLURM_LOG_DIR": str(tmp_path / "logs")})
    log = tmp_path / "logs" / f"data_pipeline-{job}.out"
    info = slurm.wait(job, timeout=240, log=log)
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    assert "data_pipeline.executor.workers=2" in log.read_text()  # the allocation's CPUs became workers
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == 20 + 3  # + the 3 rule-filter plants write_corpus adds
    assert all((out / f"{shard['prefix']}.bin").is_file() for shard in manifest["shards"])
