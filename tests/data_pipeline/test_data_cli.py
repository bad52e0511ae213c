"""`python -m data_pipeline` end to end through Hydra (a subprocess, as a user runs it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.testing import RULE_FILTERS, write_corpus

pytestmark = pytest.mark.timeout(120)


def cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "data_pipeline", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=110)


def test_cli_writes_manifest_and_shards(tmp_path):
    write_corpus(tmp_path / "in.jsonl", good=20, exact_dups=2)
    proc = cli(tmp_path, f"data_pipeline.input.paths=[{tmp_path / 'in.jsonl'}]",
               "data_pipeline.tokenizer.vocab_size=400", "data_pipeline.dedup.minhash.enabled=false",
               "data_pipeline.progress=false",
               # the rule filters (tested in-process) import spaCy: seconds per process
               *(f"data_pipeline.filters.{name}.enabled=false" for name in RULE_FILTERS))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "outputs" / "data" / "default"  # the default output_dir, relative to the working directory
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == 20 + 3 and manifest["vocab_size"] <= 400  # + the 3 rule-filter plants
    for shard in manifest["shards"]:
        assert (out / f"{shard['prefix']}.bin").stat().st_size == 2 * shard["tokens"]  # uint16
        assert (out / f"{shard['prefix']}.idx").is_file()
    assert "exact_dedup" in proc.stdout and "manifest:" in proc.stdout  # the summary table
    assert len(list((out / "hydra").glob("*/.hydra/config.yaml"))) == 1


def test_cli_config_error_is_one_line(tmp_path):
    proc = cli(tmp_path, f"data_pipeline.input.paths=[{tmp_path / 'missing.jsonl'}]")
    assert proc.returncode == 2
    assert "config error: data_pipeline.input.paths[0]=" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
