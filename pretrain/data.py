"""Token shards from the data pipeline -> megatron-core GPTDatasets -> this rank's microbatches.

The contract with ``data_pipeline`` is the ``manifest.json`` it writes next to the ``.bin``/``.idx``
shards (tokenizer, vocabulary size, end-of-document id, shard prefixes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from common.errors import ConfigError
from pretrain.config import DataConfig


@dataclass(frozen=True)
class Shards:
    """What the manifests of ``data.paths`` say, merged and checked for one shared tokenizer."""

    prefixes: list[str]
    weights: list[float] | None
    vocab_size: int
    eod_id: int
    tokenizer_path: str

    @classmethod
    def from_config(cls, data: DataConfig) -> "Shards":
        prefixes, per_path_tokens, weights = [], [], []
        first = None
        for i, path in enumerate(data.paths):
            manifest_path = Path(path) / "manifest.json"
            if not manifest_path.is_file():
                raise ConfigError(
                    f"data.paths[{i}]={path!r} has no manifest.json: run `python -m data_pipeline` to write "
                    "token shards there, or point data.paths at a directory that has them"
                )
            manifest = json.loads(manifest_path.read_text())
            if first is None:
                first = manifest
            elif manifest.get("tokenizer_sha256") != first.get("tokenizer_sha256"):
                raise ConfigError(f"data.paths[{i}]={path!r} was tokenized with a different tokenizer than data.paths[0]")
            shards = manifest["shards"]
            if not shards:
                raise ConfigError(f"data.paths[{i}]={path!r}: its manifest lists no shards")
            for shard in shards:
                prefixes.append(str(Path(path) / shard["prefix"]))
                per_path_tokens.append(shard["tokens"])
            if data.weights is not None:
                # Spread the path's weight over its shards in proportion to their tokens.
                total = sum(s["tokens"] for s in shards)
                weights += [data.weights[i] * s["tokens"] / total for s in shards]
        return cls(
            prefixes=prefixes,
            weights=weights if data.weights is not None else None,
            vocab_size=int(first["vocab_size"]),
            eod_id=int(first["eod_id"]),
            tokenizer_path=str(Path(data.paths[0]) / first["tokenizer"]),
        )


class _EodOnly:
    """The part of a megatron tokenizer GPTDataset uses: the end-of-document id (no pad id: -1 is used)."""

    vocab_size = None  # shard dtype comes from the .idx header

    def __init__(self, eod: int) -> None:
        self.eod = eod
        self.unique_identifiers = {"class": "EodOnly", "eod": eod}  # part of megatron's index-cache key


def build_datasets(data: DataConfig, shards: Shards, *, seed: int, train_samples: int, valid_samples: int,
                   cache_dir: str) -> tuple[GPTDataset, GPTDataset | None]:
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data.seq_len,
        blend=(shards.prefixes, shards.weights),
        split=data.split,
        path_to_cache=data.cache_dir or cache_dir,
        tokenizer=_EodOnly(shards.eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    if train is None:
        raise ConfigError(f"data.split={data.split!r} leaves no training documents")
    if valid_samples and valid is None:
        raise ConfigError(f"data.split={data.split!r} leaves no validation documents (needed by trainer.eval_every)")
    return train, valid


def microbatches(dataset, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 start_step: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Yield, per optimizer step, this data-parallel rank's microbatches.

    Step ``s`` uses global samples ``[s * gbs, (s + 1) * gbs)``; rank ``r`` takes the r-th contiguous
    slice, so any data-parallel degree sees the same global batch (what parity and resume rely on).
    """
    per_rank = global_batch_size // dp_size
    step = start_step
    while True:
        first = step * global_batch_size + dp_rank * per_rank
        samples = [dataset[(first + i) % len(dataset)] for i in range(per_rank)]
        yield [
            {key: torch.stack([s[key] for s in samples[j : j + micro_batch_size]]) for key in samples[0]}
            for j in range(0, per_rank, micro_batch_size)
        ]
        step += 1
