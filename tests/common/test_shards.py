"""common/shards.py, the data -> training contract: the manifest (versioned, typed, atomic) and the .idx format,
checked against megatron-core's own reader and writer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import DataError
from common.shards import (
    DTYPES,
    MANIFEST_VERSION,
    Manifest,
    ShardEntry,
    read_documents,
    read_index,
    write_index,
)

# A manifest as data_pipeline wrote it before manifests had a version (every field of that layout).
LEGACY = {
    "tokenizer": "tokenizer.json", "vocab_size": 8192, "eod_id": 8189, "dtype": "uint16",
    "shards": [{"prefix": "shards/00000_tokens", "documents": 889, "tokens": 374982}],
    "tokenizer_sha256": "5be2", "source": "/in/sample.jsonl", "sources": ["/in/sample.jsonl"], "documents": 889,
    "tokens": 374982, "special_tokens": {"<|endoftext|>": 8189}, "stats": "stats.json", "shuffled": True,
    "shuffle_seed": 1234,
}


def test_legacy_manifest_loads_and_writes_back_with_a_version(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(LEGACY))
    m = Manifest.read(tmp_path)  # the directory or the file
    assert m.version == 0 and Manifest.read(tmp_path / "manifest.json") == m
    assert (m.vocab_size, m.eod_id, m.dtype, m.shuffle_seed) == (8192, 8189, "uint16", 1234)
    assert m.shards == [ShardEntry("shards/00000_tokens", 889, 374982)]
    assert m.shard_prefixes(tmp_path) == [tmp_path / "shards" / "00000_tokens"]
    m.version = MANIFEST_VERSION
    m.write(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == {"version": MANIFEST_VERSION, **LEGACY}
    assert not list(tmp_path.glob("*.tmp"))


def test_minimal_old_manifest_takes_defaults_and_unknown_keys_survive(tmp_path):
    # pretrain.testing's manifests had only these fields; a newer writer of the same version may add keys.
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"vocab_size": 256, "eod_id": 255, "shards": [{"prefix": "s"}], "note": {"by": "hand"}}))
    m = Manifest.read(tmp_path)
    assert (m.tokenizer, m.dtype, m.shuffled, m.shards) == ("tokenizer.json", None, False, [ShardEntry("s")])
    assert m.extra == {"note": {"by": "hand"}}
    assert m.to_dict()["note"] == {"by": "hand"} and m.to_dict()["shards"] == [{"prefix": "s"}]


@pytest.mark.parametrize("content, message", [
    (None, "manifest.json is missing: `python -m data_pipeline` writes it"),
    ("{not json", "manifest.json is not valid JSON (Expecting property name"),
    ("[1, 2]", "manifest.json is not a manifest (a JSON list, not an object)"),
    (json.dumps({**LEGACY, "version": MANIFEST_VERSION + 1}),
     f"manifest.json has manifest version {MANIFEST_VERSION + 1}; this code reads versions up to {MANIFEST_VERSION}"),
    (json.dumps({k: v for k, v in LEGACY.items() if k != "eod_id"}), "manifest.json has no 'eod_id' field"),
    (json.dumps({**LEGACY, "vocab_size": "8192"}), "manifest.json: vocab_size must be a positive integer, got '8192'"),
    (json.dumps({**LEGACY, "shuffled": 1}), "manifest.json: shuffled must be true or false, got 1"),
    (json.dumps({**LEGACY, "dtype": "float16"}), "manifest.json: dtype='float16' is not a megatron token dtype"),
    (json.dumps({**LEGACY, "shards": [{"prefix": "a", "tokens": -1}]}),
     "manifest.json: shards[0].tokens must be a non-negative integer, got -1"),
])
def test_bad_manifest_is_one_data_error_naming_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(DataError) as err:
        Manifest.read(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'manifest.json'}"), str(err.value)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dtype_codes_and_magic_are_megatrons():
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    import common.shards as shards

    assert shards.IDX_MAGIC == _INDEX_HEADER
    assert {code: np.dtype(t) for code, t in DTYPES.items()} == {d.value: np.dtype(d.name) for d in DType}


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_written_index_reads_back_in_megatron_and_megatrons_in_ours(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, n).astype(dtype) for n in (5, 1, 17, 3)]
    ours = tmp_path / "ours"
    np.concatenate(docs).tofile(f"{ours}.bin")
    with open(f"{ours}.idx", "wb") as f:
        write_index(f, [len(d) for d in docs], dtype)
    theirs = tmp_path / "theirs"
    builder = IndexedDatasetBuilder(f"{theirs}.bin", dtype=dtype)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(f"{theirs}.idx")
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()
    dataset = IndexedDataset(str(ours))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [d.tolist() for d in docs]
    index = read_index(theirs)
    assert (index.dtype, index.documents, index.tokens) == (np.dtype(dtype), 4, 26)
    assert [d.tolist() for d in read_documents(theirs)] == [d.tolist() for d in docs]


def test_empty_index(tmp_path):
    with open(tmp_path / "e.idx", "wb") as f:
        write_index(f, [], np.uint16)
    (tmp_path / "e.bin").write_bytes(b"")
    index = read_index(tmp_path / "e")
    assert (index.dtype.name, index.documents, index.tokens) == ("uint16", 0, 0)
    assert read_documents(tmp_path / "e") == []


def test_a_directory_that_does_not_exist_names_its_manifest(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path / 'out' / 'manifest.json'} is missing"):
        Manifest.read(tmp_path / "out")
