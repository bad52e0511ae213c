"""Shards hold each task's documents in a seeded random order (data_pipeline.tokenizer.shuffle_documents), so
megatron-core's contiguous validation range is a sample; input order when off; crash-safe; reproducible."""
from __future__ import annotations

import gzip
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError
from common.shards import read_index, shard_order
from data_pipeline.config import TokenizerConfig
from data_pipeline.testing import prose
from data_pipeline.shard_writer import ShardWriter
from data_pipeline.tokenizer import load_for_encoding, save_atomic, train_bpe

pytestmark = pytest.mark.timeout(120)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_DOCS = 60


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A task's input (work/kept/00000.jsonl.gz: N_DOCS documents of different lengths) and a tokenizer."""
    root = tmp_path_factory.mktemp("order")
    rng = random.Random(3)
    texts = [prose(rng, paragraphs=rng.randint(1, 5)) for _ in range(N_DOCS)]
    (root / "kept").mkdir()
    with gzip.open(root / "kept" / "00000.jsonl.gz", "wt") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t, "metadata": {}}) + "\n")
    save_atomic(train_bpe(texts, vocab_size=400, special_tokens=SPECIALS), root / "tokenizer.json")
    tok = load_for_encoding(root / "tokenizer.json")
    eod = tok.token_to_id("<|endoftext|>")
    return {"root": root, "texts": texts, "ids": [tok.encode(t).ids + [eod] for t in texts]}


def write_shard(kept, out: Path, seed: int | None, rank: int = 0, writer_cls=ShardWriter) -> tuple[bytes, bytes]:
    """The tokenize stage of task ``rank`` (reader + ShardWriter, in this process) over ``kept``'s documents."""
    from data_pipeline.readers import StageOutputReader

    writer = writer_cls(str(out), str(kept["root"] / "tokenizer.json"), eos_token="<|endoftext|>",
                        parse_special_tokens=False, backend="hf", special_tokens=SPECIALS, shuffle_seed=seed,
                        batch_size=7)
    docs = StageOutputReader(str(kept["root"] / "kept")).run(None, 0, 1)
    for _ in writer.run(docs, rank, rank + 1):
        pass
    prefix = out / f"{rank:05d}_tokens"
    return prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()


def summary(prefix: Path) -> tuple[str, int, int]:
    """(dtype, documents, tokens) of a shard's .idx."""
    index = read_index(prefix)
    return index.dtype.name, index.documents, index.tokens


def read_docs(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_shard_order_is_a_seeded_permutation_per_task():
    order = shard_order(1000, 1234, 0)
    assert sorted(order.tolist()) == list(range(1000)) and order.tolist() != list(range(1000))
    assert np.array_equal(order, shard_order(1000, 1234, 0))  # same seed and rank: same order
    assert not np.array_equal(order, shard_order(1000, 1234, 1))  # each task its own order
    assert not np.array_equal(order, shard_order(1000, 1235, 0))
    assert shard_order(5, None, 3).tolist() == [0, 1, 2, 3, 4]
    assert shard_order(0, 1234, 0).tolist() == []


def test_without_shuffle_shards_keep_input_order_in_datatrove_format(kept, tmp_path):
    from datatrove.pipeline.tokens.megatron_tokenizer import MegatronTokenizedFile

    bin_, idx = write_shard(kept, tmp_path / "plain", seed=None)
    assert read_docs(tmp_path / "plain" / "00000_tokens") == kept["ids"]
    # byte for byte what datatrove's own MegatronTokenizedFile writes for these documents
    ref = MegatronTokenizedFile(str(tmp_path / "ref"), "ref", token_size=2)
    for ids in kept["ids"]:
        ref.write(ids)
    ref.close()
    assert (tmp_path / "ref" / "ref.bin").read_bytes() == bin_
    assert (tmp_path / "ref" / "ref.idx").read_bytes() == idx


def test_shuffled_shard_is_the_recorded_permutation_and_reproducible(kept, tmp_path):
    _, plain_idx = write_shard(kept, tmp_path / "plain", seed=None)
    bin_, idx = write_shard(kept, tmp_path / "a", seed=1234)
    docs = read_docs(tmp_path / "a" / "00000_tokens")
    order = shard_order(N_DOCS, 1234, 0)
    assert order.tolist() != list(range(N_DOCS))
    assert docs == [kept["ids"][i] for i in order]  # position i holds input document order[i]
    assert docs != kept["ids"] and sorted(map(tuple, docs)) == sorted(map(tuple, kept["ids"]))
    # same documents and tokens as the unshuffled shard: the manifest's counts do not move
    assert summary(tmp_path / "a" / "00000_tokens") == summary(tmp_path / "plain" / "00000_tokens") \
        == ("uint16", N_DOCS, sum(map(len, kept["ids"])))
    assert idx != plain_idx
    # the temporary input-order copy is gone, nothing else is left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["00000_tokens.bin", "00000_tokens.idx"]
    # a re-run (also into a folder that already holds the shard) writes the same bytes
    assert write_shard(kept, tmp_path / "b", seed=1234) == (bin_, idx)
    assert write_shard(kept, tmp_path / "a", seed=1234) == (bin_, idx)
    # another seed, or another task with the same seed: another order
    assert write_shard(kept, tmp_path / "c", seed=7)[0] != bin_
    assert read_docs(tmp_path / "c" / "00000_tokens") == [kept["ids"][i] for i in shard_order(N_DOCS, 7, 0)]
    write_shard(kept, tmp_path / "d", seed=1234, rank=1)
    assert read_docs(tmp_path / "d" / "00001_tokens") == [kept["ids"][i] for i in shard_order(N_DOCS, 1234, 1)]


class _Killed(Exception):
    pass


class CrashingWriter(ShardWriter):
    """Dies half-way through the shuffled copy, after part of the final .bin is written."""

    def _copy_in_order(self, src, dst, sizes, order):
        with self.output_folder.open(dst, mode="wb") as out:
            out.write(b"\0" * 10)
        raise _Killed


def test_a_task_killed_mid_copy_leaves_no_complete_looking_shard(kept, tmp_path):
    out = tmp_path / "out"
    good = write_shard(kept, out, seed=1234)  # a complete shard from an earlier run
    with pytest.raises(_Killed):
        write_shard(kept, out, seed=1234, writer_cls=CrashingWriter)
    # the partial .bin has no .idx beside it (megatron-core and the manifest stage need one); the stale one
    # from the earlier run was deleted before anything was written
    assert not (out / "00000_tokens.idx").exists() and not list(out.glob("*.tmp"))
    assert (out / "00000_tokens.bin").stat().st_size == 10
    with pytest.raises(FileNotFoundError):
        read_index(out / "00000_tokens")
    # the resumed task (datatrove did not mark it complete) writes the same shard and cleans up
    assert write_shard(kept, out, seed=1234) == good
    assert sorted(p.name for p in out.iterdir()) == ["00000_tokens.bin", "00000_tokens.idx"]


def test_an_empty_task_writes_an_empty_readable_shard(tmp_path, kept):
    (tmp_path / "root" / "kept").mkdir(parents=True)
    with gzip.open(tmp_path / "root" / "kept" / "00000.jsonl.gz", "wt"):
        pass
    (tmp_path / "root" / "tokenizer.json").write_bytes((kept["root"] / "tokenizer.json").read_bytes())
    bin_, _ = write_shard({"root": tmp_path / "root"}, tmp_path / "out", seed=1234)
    assert bin_ == b"" and summary(tmp_path / "out" / "00000_tokens") == ("uint16", 0, 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(shuffle_seed=-1), r"data_pipeline\.tokenizer\.shuffle_seed must be an integer >= 0, got -1"),
    (dict(shuffle_seed=1.5), r"data_pipeline\.tokenizer\.shuffle_seed must be an integer >= 0, got 1\.5"),
    (dict(shuffle_documents="yes"), r"data_pipeline\.tokenizer\.shuffle_documents must be true or false"),
])
def test_bad_shuffle_settings_name_their_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TokenizerConfig(**kwargs)


def test_pipeline_records_the_order_and_keeps_counts(tmp_path):
    """The whole pipeline, shuffled and not: same manifest but for ``shuffled``/``shuffle_seed``; the shuffled
    shard is the recorded permutation of the kept documents, the other keeps their order."""
    from data_pipeline import run_pipeline
    from data_pipeline.config import DedupConfig, MinhashConfig
    from data_pipeline.testing import no_rule_filters, read_jsonl_gz, small_config, write_corpus

    write_corpus(tmp_path / "in.jsonl", good=20, exact_dups=0)
    base = small_config([tmp_path / "in.jsonl"], tmp_path / "on", vocab_size=400, filters=no_rule_filters(),
                        dedup=DedupConfig(exact=False, minhash=MinhashConfig(enabled=False)))
    on = run_pipeline(base).manifest
    off_cfg = replace(base, output_dir=str(tmp_path / "off"),
                      tokenizer=replace(base.tokenizer, shuffle_documents=False))
    off = run_pipeline(off_cfg).manifest
    assert (on.shuffled, on.shuffle_seed, off.shuffled, off.shuffle_seed) == (True, 1234, False, None)
    strip = lambda m: {k: v for k, v in m.to_dict().items() if k not in ("shuffled", "shuffle_seed", "source", "sources")}
    assert strip(on) == strip(off)  # shards' documents and tokens, tokenizer hash, ...
    tok = load_for_encoding(tmp_path / "on" / "tokenizer.json")
    kept_ids = [tok.encode(d["text"]).ids + [on.eod_id]
                for d in read_jsonl_gz(tmp_path / "on" / "work" / "kept" / "00000.jsonl.gz")]
    assert len(kept_ids) == on.documents == 23
    assert read_docs(tmp_path / "off" / "shards" / "00000_tokens") == kept_ids
    order = shard_order(len(kept_ids), on.shuffle_seed, 0)
    assert read_docs(tmp_path / "on" / "shards" / "00000_tokens") == [kept_ids[i] for i in order] != kept_ids
    # an output made in input order is not resumed as a shuffled one
    with pytest.raises(ConfigError, match=r"different settings \(tokenizer\.shuffle_documents\)"):
        run_pipeline(replace(off_cfg, tokenizer=base.tokenizer))
