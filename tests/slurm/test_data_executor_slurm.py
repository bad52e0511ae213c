"""The data stages through datatrove's SlurmPipelineExecutor, on the real local Slurm cluster (conftest.py)."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from data_pipeline import run_pipeline
from data_pipeline.config import DedupConfig, ExecutorConfig, MinhashConfig, SlurmConfig
from data_pipeline.testing import small_config, write_corpus

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def default_partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    partitions = [p for p in out.split() if p]
    assert partitions, "the Slurm cluster reports no partition"
    return next((p.rstrip("*") for p in partitions if p.endswith("*")), partitions[0])


def queued(job_ids: list[str]) -> list[str]:
    """Those of ``job_ids`` still pending or running."""
    out = subprocess.run(["squeue", "-h", "-o", "%A", "-j", ",".join(job_ids)], capture_output=True, text=True,
                         timeout=30).stdout
    return sorted(set(out.split()) & set(job_ids))


def test_slurm_executor_runs_the_stages_as_dependent_jobs(slurm_cluster, tmp_path):
    partition = default_partition()
    write_corpus(tmp_path / "in.jsonl", good=12, exact_dups=2)
    cfg = small_config([tmp_path / "in.jsonl"], tmp_path / "out", vocab_size=400,
                       dedup=DedupConfig(exact=True, minhash=MinhashConfig(enabled=False)),
                       executor=ExecutorConfig(kind="slurm", slurm=SlurmConfig(partition=partition, time="00:10:00")))
    submitted = run_pipeline(cfg)
    # filter, exact_find, exact_dedup, train_tokenizer, tokenize, manifest
    assert submitted.manifest is None and len(submitted.slurm_jobs) == 6
    manifest_path = tmp_path / "out" / "manifest.json"
    try:
        deadline = time.time() + 240
        while queued(submitted.slurm_jobs) and time.time() < deadline:
            time.sleep(2)
        logs = "\n".join(p.read_text()[-1500:] for p in (tmp_path / "out" / "slurm_logs").rglob("*.out"))
        assert manifest_path.exists(), logs
    finally:
        if left := queued(submitted.slurm_jobs):  # only on a timeout: cancel what this test submitted
            subprocess.run(["scancel", *left], capture_output=True, timeout=30)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["documents"] == 12
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert {s["stage"]: s["dropped"] for s in stats["stages"]}["exact_dedup"] == {"duplicate": 2}
    # submitting again finds everything done: no new jobs, the finished summary
    again = run_pipeline(cfg)
    assert again.slurm_jobs == [] and again.manifest.to_dict() == manifest
