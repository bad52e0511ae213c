"""The pipeline end to end on a tiny corpus: counts, deduplication, shards, tokenizer layout, manifest, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from common.errors import ConfigError
from data_pipeline import run_pipeline
from data_pipeline.testing import read_jsonl_gz, small_config
from common.shards import shard_order
from data_pipeline.tokenizer import load_for_encoding

SPECIAL_TEXT = "A literal <|endoftext|> marker sits in this sentence and must not end the document."
VOCAB = 1000  # as in conftest.pipeline_run

pytestmark = pytest.mark.timeout(120)


def stages(run) -> dict:
    return {s.stage: s for s in run["summary"].stages}


def kept_docs(out, rank: int) -> list[dict]:
    return read_jsonl_gz(out / "work" / "kept" / f"{rank:05d}.jsonl.gz")


def test_counts_are_conserved_at_every_stage(pipeline_run):
    summary = pipeline_run["summary"]
    names = [s.stage for s in summary.stages]
    assert names == ["read", "gopher_repetition", "gopher_quality", "c4", "fineweb", "exact_dedup",
                     "minhash_dedup", "tokenize"]
    for s in summary.stages:
        assert s.read == s.kept + sum(s.dropped.values()), s
    for before, after in zip(summary.stages, summary.stages[1:]):
        assert after.read == before.kept, (before, after)
    assert summary.stages[0].read == pipeline_run["expected"]["records"]
    # stats.json on disk says the same
    on_disk = json.loads((pipeline_run["out"] / "stats.json").read_text())
    assert [s["stage"] for s in on_disk["stages"]] == names
    assert on_disk["documents"] == summary.stages[-1].kept


def test_bad_records_are_counted_not_fatal(pipeline_run):
    read = stages(pipeline_run)["read"]
    exp = pipeline_run["expected"]
    assert read.dropped == {"bad_json": exp["bad_json"], "missing_text": exp["missing_text"]}
    assert read.kept == exp["records"] - exp["bad_json"] - exp["missing_text"]


def test_quality_filters_drop_the_planted_documents_and_write_them_out(pipeline_run):
    summary, out = pipeline_run["summary"], pipeline_run["out"]
    filter_stages = [s for s in summary.stages if s.stage in ("gopher_repetition", "gopher_quality", "c4", "fineweb")]
    assert sum(sum(s.dropped.values()) for s in filter_stages) == pipeline_run["expected"]["filtered"]
    excluded = {}
    for s in filter_stages:
        for rank in range(2):
            for doc in read_jsonl_gz(out / "excluded" / s.stage / f"{rank:05d}.jsonl.gz"):
                excluded.setdefault(doc["id"], []).append(s.stage)
                assert doc["metadata"]["filter_reason"] in s.dropped
    assert sorted(excluded) == ["lorem", "repetitive", "short"]
    assert all(len(stages_) == 2 for stages_ in excluded.values())  # once per input file


def test_exact_duplicates_are_all_removed(pipeline_run):
    out = pipeline_run["out"]
    dedup = stages(pipeline_run)["exact_dedup"]
    assert dedup.dropped == {"duplicate": pipeline_run["expected"]["exact_dups"]}
    texts = [d["text"] for rank in range(2) for d in kept_docs(out, rank)]
    assert len(texts) == len(set(texts))
    assert sorted(texts) == pipeline_run["expected"]["kept_texts"]
    # MinHash found nothing more: the survivors are all distinct documents (no false positives)
    assert stages(pipeline_run)["minhash_dedup"].dropped == {}


def test_shards_hold_exactly_the_tokenizer_ids_plus_eod(pipeline_run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = pipeline_run["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    tok = load_for_encoding(out / manifest["tokenizer"])
    eod = manifest["eod_id"]
    assert len(manifest["shards"]) == 2
    assert (manifest["shuffled"], manifest["shuffle_seed"]) == (True, 1234)  # the default
    for rank, shard in enumerate(manifest["shards"]):
        assert shard["prefix"] == f"shards/{rank:05d}_tokens"
        dataset = IndexedDataset(str(out / shard["prefix"]))
        docs = kept_docs(out, rank)
        assert len(dataset) == len(docs) == shard["documents"]
        # each task's documents in the recorded seeded order, which is not the order the task read them in
        order = shard_order(len(docs), manifest["shuffle_seed"], rank)
        assert sorted(order.tolist()) == list(range(len(docs))) != order.tolist()
        total = 0
        for i, doc in enumerate(docs[j] for j in order):
            expected = tok.encode(doc["text"]).ids + [eod]
            got = dataset[i]
            assert got.tolist() == expected, doc["id"]
            assert (got[:-1] != eod).all()  # the literal "<|endoftext|>" in one document stays text
            total += len(got)
        assert total == shard["tokens"] == int(np.sum(dataset.sequence_lengths))
        assert dataset[0].dtype == np.dtype(manifest["dtype"])
    assert any(SPECIAL_TEXT in d["text"] for rank in range(2) for d in kept_docs(out, rank))


def test_special_tokens_follow_the_regular_vocabulary(pipeline_run):
    out = pipeline_run["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    regular = tok.get_vocab(with_added_tokens=False)
    n = len(regular)
    assert sorted(regular.values()) == list(range(n))
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [n, n + 1, n + 2]
    assert manifest["vocab_size"] == n + 3 == tok.get_vocab_size(with_added_tokens=True) <= VOCAB
    assert manifest["eod_id"] == n
    assert manifest["special_tokens"] == {"<|endoftext|>": n, "<|im_start|>": n + 1, "<|im_end|>": n + 2}
    # byte-level: every byte has a token, so nothing is unknown, and decoding round-trips
    text = "Grüße, 你好 🎉\n\tcode(x) = 42;"
    assert tok.decode(tok.encode(text).ids) == text


def test_manifest_is_the_trainer_contract(pipeline_run):
    out = pipeline_run["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("tokenizer", "vocab_size", "eod_id", "dtype", "shards", "tokenizer_sha256", "source"):
        assert key in manifest, key
    assert manifest["dtype"] == "uint16"  # vocabulary < 65536
    assert manifest["documents"] == sum(s["documents"] for s in manifest["shards"]) \
        == pipeline_run["summary"].stages[-1].kept == len(pipeline_run["expected"]["kept_texts"])
    assert manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"])
    import hashlib

    assert manifest["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["source"] == str(out.parent / "in")
    assert not list(out.glob("*.tmp"))
    assert sorted(p.name for p in (out / "shards").iterdir()) == \
        ["00000_tokens.bin", "00000_tokens.idx", "00001_tokens.bin", "00001_tokens.idx"]  # no temporary files


def test_rerun_resumes_without_rewriting(pipeline_run, tmp_path):
    out, cfg = pipeline_run["out"], pipeline_run["cfg"]
    shard = out / "shards" / "00000_tokens.bin"
    before = (shard.stat().st_mtime_ns, shard.read_bytes(), (out / "manifest.json").read_text())
    again = run_pipeline(cfg)
    assert (shard.stat().st_mtime_ns, shard.read_bytes(), (out / "manifest.json").read_text()) == before
    assert again.stages == pipeline_run["summary"].stages

    # A run killed while tokenizing task 0: no manifest yet, task 0 not marked complete. The re-run redoes
    # only that task and writes the shard once (same bytes, not appended).
    (out / "logs" / "tokenize" / "completions" / "00000").unlink()
    (out / "manifest.json").unlink()
    other = out / "shards" / "00001_tokens.bin"
    other_mtime = other.stat().st_mtime_ns
    resumed = run_pipeline(cfg)
    assert shard.read_bytes() == before[1]
    assert other.stat().st_mtime_ns == other_mtime
    assert (out / "manifest.json").read_text() == before[2]
    assert resumed.stages == pipeline_run["summary"].stages


def test_other_settings_on_the_same_output_dir_are_refused(pipeline_run):
    from dataclasses import replace

    cfg = pipeline_run["cfg"]
    changed = replace(cfg, filters=replace(cfg.filters, c4=replace(cfg.filters.c4, enabled=False)))
    with pytest.raises(ConfigError, match=r"different settings \(filters\.c4\.enabled\).*overwrite=true"):
        run_pipeline(changed)


def test_missing_input_is_a_config_error(tmp_path):
    cfg = small_config([tmp_path / "nope.jsonl"], tmp_path / "out")
    with pytest.raises(ConfigError, match=r"data_pipeline\.input\.paths\[0\]=.*nope\.jsonl.* does not exist"):
        run_pipeline(cfg)
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_output_made_with_other_settings(tmp_path):
    from dataclasses import replace

    from data_pipeline.config import DedupConfig, MinhashConfig
    from data_pipeline.testing import no_rule_filters, write_corpus

    write_corpus(tmp_path / "in.jsonl", good=10, exact_dups=2)
    first = small_config([tmp_path / "in.jsonl"], tmp_path / "out", vocab_size=400, filters=no_rule_filters(),
                         dedup=DedupConfig(exact=False, minhash=MinhashConfig(enabled=False)))
    assert run_pipeline(first).manifest.documents == 15  # 10 + 2 copies + 3 planted
    (tmp_path / "out" / "hydra").mkdir()
    second = replace(first, dedup=DedupConfig(exact=True, minhash=MinhashConfig(enabled=False)), overwrite=True)
    summary = run_pipeline(second)
    assert summary.manifest.documents == 13
    assert [s.stage for s in summary.stages] == ["read", "exact_dedup", "tokenize"]
    assert (tmp_path / "out" / "hydra").is_dir()  # Hydra's record of the running job is kept
