"""MinHash near-deduplication on planted near-duplicates, and input formats (Parquet, custom field names)."""
from __future__ import annotations

import json
import random

import pytest

from data_pipeline import run_pipeline
from data_pipeline.config import DedupConfig, InputConfig, MinhashConfig
from data_pipeline.testing import no_rule_filters, prose, read_jsonl_gz, small_config, write_corpus

pytestmark = pytest.mark.timeout(120)


def test_minhash_removes_planted_near_duplicates_only(tmp_path):
    good, near = 60, 12
    info = write_corpus(tmp_path / "in.jsonl", good=good, exact_dups=0, near_dups=near, seed=3)
    partners = {(i * 7) % good for i in range(near)}  # write_corpus: near-i copies good-((7 i) % good)
    assert len(partners) == near
    cfg = small_config([tmp_path / "in.jsonl"], tmp_path / "out", filters=no_rule_filters(),
                       dedup=DedupConfig(exact=False, minhash=MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)))
    summary = run_pipeline(cfg)
    stage = {s.stage: s for s in summary.stages}["minhash_dedup"]
    assert stage.dropped == {"near_duplicate": near}
    removed = {d["id"] for d in read_jsonl_gz(tmp_path / "out" / "excluded" / "minhash_dedup" / "00000.jsonl.gz")}
    kept = {d["id"] for d in read_jsonl_gz(tmp_path / "out" / "work" / "kept" / "00000.jsonl.gz")}
    assert len(removed) == near
    # one of each planted pair goes; nothing else does (no false positives)
    allowed = {f"near-{i}" for i in range(near)} | {f"good-{k}" for k in partners}
    assert removed <= allowed, removed - allowed
    for i in range(near):
        assert (f"near-{i}" in kept) != (f"good-{(i * 7) % good}" in kept)
    assert {f"good-{k}" for k in range(good) if k not in partners} <= kept
    assert {"short", "repetitive", "lorem"} <= kept  # filters off here
    assert summary.manifest.documents == info["records"] - near


def test_parquet_input_with_custom_field_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    texts = [prose(rng) for _ in range(12)]
    rows = {"content": texts + [texts[0], None, ""], "doc_id": [f"p{i}" for i in range(15)]}
    pq.write_table(pa.table(rows), tmp_path / "docs.parquet")
    cfg = small_config([tmp_path / "docs.parquet"], tmp_path / "out", filters=no_rule_filters(),
                       dedup=DedupConfig(exact=True, minhash=MinhashConfig(enabled=False)))
    cfg.input = InputConfig(paths=[str(tmp_path / "docs.parquet")], text_key="content", id_key="doc_id")
    summary = run_pipeline(cfg)
    stage = {s.stage: s for s in summary.stages}
    assert (stage["read"].read, stage["read"].kept, stage["read"].dropped) == (15, 13, {"missing_text": 2})
    assert stage["exact_dedup"].dropped == {"duplicate": 1}
    assert summary.manifest.documents == 12
    kept = read_jsonl_gz(tmp_path / "out" / "work" / "kept" / "00000.jsonl.gz")
    assert sorted(d["text"] for d in kept) == sorted(texts)
    assert {d["id"] for d in kept} <= {f"p{i}" for i in range(13)}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"] == [str(tmp_path / "docs.parquet")]


def test_listed_files_are_spread_over_tasks_like_a_folders(tmp_path):
    """data_pipeline.input.paths=[a, b, c, d] with 4 tasks: one reader for the four files, so each task reads
    one (datatrove hands a one-file reader's file to task 0: all work in task 0, one shard)."""
    from data_pipeline.config import ExecutorConfig

    files = [tmp_path / "in" / f"part-{i}.jsonl" for i in range(4)]
    for i, path in enumerate(files):
        write_corpus(path, good=10 + i, exact_dups=0, seed=20 + i)
    executor = ExecutorConfig(tasks=4, workers=1)
    dedup = DedupConfig(exact=False, minhash=MinhashConfig(enabled=False))
    listed = run_pipeline(small_config(files, tmp_path / "listed", vocab_size=400, filters=no_rule_filters(),
                                       dedup=dedup, executor=executor)).manifest
    folder = run_pipeline(small_config([tmp_path / "in"], tmp_path / "folder", vocab_size=400,
                                       filters=no_rule_filters(), dedup=dedup, executor=executor)).manifest
    assert [s.prefix for s in listed.shards] == [f"shards/{t:05d}_tokens" for t in range(4)]  # 4 non-empty shards
    assert all(s.documents for s in listed.shards)
    assert listed.documents == folder.documents == sum(13 + i for i in range(4))  # + 3 planted rule-filter docs each
    assert sorted(s.documents for s in listed.shards) == sorted(s.documents for s in folder.shards)
