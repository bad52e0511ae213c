"""Helpers for tests and benchmarks: small token shards in the data pipeline's on-disk format."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def write_learnable_shards(out_dir: Path, *, vocab_size: int = 256, documents: int = 64, doc_len: int = 200,
                           seed: int = 0) -> Path:
    """Write one ``.bin``/``.idx`` shard + manifest.json of documents a model can learn quickly.

    Each document is an arithmetic progression modulo ``vocab_size - 1`` with a random start and
    stride from a small set, ended by the EOD id ``vocab_size - 1``: next-token loss drops well below
    log(vocab) within tens of steps.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    eod = vocab_size - 1
    prefix = out_dir / "shard_00000"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    total = 0
    for _ in range(documents):
        start, stride = int(rng.integers(0, eod)), int(rng.choice([1, 2, 3, 5]))
        doc = (start + stride * np.arange(doc_len)) % eod
        builder.add_document(np.append(doc, eod).astype(np.int32), [doc_len + 1])
        total += doc_len + 1
    builder.finalize(f"{prefix}.idx")
    manifest = {
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": hashlib.sha256(f"synthetic-{vocab_size}".encode()).hexdigest(),
        "vocab_size": vocab_size,
        "eod_id": eod,
        "dtype": "int32",
        "shards": [{"prefix": prefix.name, "documents": documents, "tokens": total}],
        "source": "pretrain.testing.write_learnable_shards",
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir
