"""Helpers for tests and benchmarks: small token shards in the data pipeline's on-disk format."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from common.shards import Manifest, ShardEntry


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
    Manifest(tokenizer_sha256=hashlib.sha256(f"synthetic-{vocab_size}".encode()).hexdigest(), vocab_size=vocab_size,
             eod_id=eod, dtype="int32", shards=[ShardEntry(prefix.name, documents, total)], documents=documents,
             tokens=total, source="pretrain.testing.write_learnable_shards").write(out_dir)
    return out_dir


def read_wandb_history(run_file: Path) -> list[dict]:
    """The ``history`` rows of an offline ``run-<id>.wandb`` file, decoded with wandb's own protobuf schema.

    wandb >= 0.2x has no Python reader left (its core is a Go binary). The file is a LevelDB-style log:
    a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of records, each with a 7-byte
    header (CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last) and a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file} is not a wandb run file")
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in record.history.item
                })
    return rows
