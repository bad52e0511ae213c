"""Token shards from the data pipeline -> megatron-core GPTDatasets -> this rank's microbatches.

The contract with ``data_pipeline`` is the ``manifest.json`` it writes next to the ``.bin``/``.idx``
shards (tokenizer, vocabulary size, end-of-document id, shard prefixes): :class:`common.shards.Manifest`.

Real outputs have many shards (one per data-stage task) and blends have sources of very different
sizes. megatron-core splits every shard into train/validation/test by documents (``data.split``) and
loops forever on a split part with no tokens, so the blend of each split is planned here first
(:func:`plan_blend`): a shard whose part of a split is empty is left out of that split's blend and its
source's weight is spread over the source's other shards; a source with no training documents is a
``ConfigError``; a source with no validation documents is left out of validation (a warning names it)
and only when no source has any is validation a ``ConfigError``. Nothing here can hang. The plan is made
once per process (:func:`check_blend`, which reads every shard's .idx) and carried to :func:`build_datasets`
on :attr:`Shards.blend`.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from common.errors import ConfigError
from common.shards import MANIFEST_NAME, Manifest
from pretrain.config import DataConfig

log = logging.getLogger(__name__)

# What one training step reads from a sample; megatron's BlendedDataset adds a numpy ``dataset_id``.
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass(frozen=True)
class Shards:
    """What the manifests of ``data.paths`` say, merged and checked for one shared tokenizer."""

    prefixes: list[str]
    path_of: list[int]
    """For each prefix, the index in ``data.paths`` of the output it belongs to."""
    path_weights: list[float] | None
    """``data.weights`` (one per path), or None: proportional to each path's tokens."""
    vocab_size: int
    eod_id: int
    tokenizer_path: str
    blend: "BlendPlan | None" = None
    """Each split's blend once :func:`check_blend` planned it (:meth:`with_blend`); build_datasets uses it."""

    @classmethod
    def from_config(cls, data: DataConfig) -> "Shards":
        """ConfigError for a path without a manifest; DataError naming a manifest that cannot be read."""
        prefixes, path_of = [], []
        first = None
        for i, path in enumerate(data.paths):
            manifest_path = Path(path) / MANIFEST_NAME
            if not manifest_path.is_file():
                raise ConfigError(
                    f"data.paths[{i}]={path!r} has no manifest.json: run `python -m data_pipeline` to write "
                    "token shards there, or point data.paths at a directory that has them"
                )
            manifest = Manifest.read(manifest_path)
            if first is None:
                first = manifest
            elif manifest.tokenizer_sha256 != first.tokenizer_sha256:
                raise ConfigError(f"data.paths[{i}]={path!r} was tokenized with a different tokenizer than data.paths[0]")
            if not manifest.shards:
                raise ConfigError(f"data.paths[{i}]={path!r}: its manifest lists no shards")
            for prefix in manifest.shard_prefixes(path):
                prefixes.append(str(prefix))
                path_of.append(i)
        return cls(
            prefixes=prefixes,
            path_of=path_of,
            path_weights=list(data.weights) if data.weights is not None else None,
            vocab_size=first.vocab_size,
            eod_id=first.eod_id,
            tokenizer_path=str(Path(data.paths[0]) / first.tokenizer),
        )

    def with_blend(self, blend: "BlendPlan") -> "Shards":
        return dataclasses.replace(self, blend=blend)


@dataclass(frozen=True)
class SplitBlend:
    """The shards one split draws from, and their weights (None: one shard, megatron's plain dataset)."""

    split: Split
    prefixes: list[str]
    weights: list[float] | None
    path_shares: dict[int, float]
    """Each contributing ``data.paths`` index -> its share of this split's samples (sums to 1)."""


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """megatron-core's book-ends of ``data.split`` ("98,2,0" -> [(0, .98), (.98, 1), None])."""
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def split_tokens(prefix: str, bookends: tuple[float, float] | None) -> int:
    """Tokens of the documents megatron-core puts in one split of one shard (its own rounding rule)."""
    if bookends is None:
        return 0
    index = IndexedDataset(prefix)  # memory-mapped: its arrays live only as long as it does
    lengths = np.array(index.sequence_lengths)
    del index
    n = len(lengths)
    beg, end = int(round(bookends[0] * n)), int(round(bookends[1] * n))
    return int(lengths[beg:end].sum(dtype=np.int64))


def plan_blend(data: DataConfig, shards: Shards, split: Split) -> SplitBlend | None:
    """The blend of one split; None when no source has documents in it (the caller decides if that is an error).

    Raises ConfigError when a source has no training documents: training would silently ignore it.
    """
    bookends = split_matrix(data.split)[split.value]
    tokens = [split_tokens(prefix, bookends) for prefix in shards.prefixes]
    per_path = [0] * len(data.paths)
    for path, n in zip(shards.path_of, tokens):
        per_path[path] += n
    for i, n in enumerate(per_path):
        if n:
            continue
        where = f"data.paths[{i}]={data.paths[i]!r}"
        if split == Split.train:
            raise ConfigError(f"{where} has no training documents under data.split={data.split!r}: "
                              "give training a larger share of the split, or drop the path")
        if any(per_path):
            log.warning("%s has no %s documents under data.split=%r (too few documents in each shard): "
                        "validation uses the other paths only", where, split.name, data.split)
    if not any(per_path):
        return None
    # A path's weight: data.weights, else its tokens in this split; spread over its shards by their tokens.
    path_weight = [(shards.path_weights[i] if shards.path_weights is not None else n) if n else 0.0
                   for i, n in enumerate(per_path)]
    total = sum(path_weight)
    shares = {i: w / total for i, w in enumerate(path_weight) if w}
    keep = [j for j, n in enumerate(tokens) if n]
    prefixes = [shards.prefixes[j] for j in keep]
    if len(prefixes) == 1 and shards.path_weights is None:
        weights = None  # one shard: megatron's plain GPTDataset, no blending index
    else:
        weights = [shares[shards.path_of[j]] * tokens[j] / per_path[shards.path_of[j]] for j in keep]
    return SplitBlend(split, prefixes, weights, shares)


@dataclass(frozen=True)
class BlendPlan:
    """The blends of the splits training uses, and what they were planned for."""

    split: str
    """``data.split`` they were planned under."""
    train: SplitBlend
    valid: SplitBlend | None
    """None when validation was not planned (``validation=False``)."""


def check_blend(data: DataConfig, shards: Shards, *, validation: bool) -> BlendPlan:
    """Everything :func:`build_datasets` would refuse, before any process starts (reads only .idx files).
    Returns the plan: pass it on with ``shards.with_blend(plan)``, and build_datasets reads no .idx again."""
    train = plan_blend(data, shards, Split.train)
    valid = plan_blend(data, shards, Split.valid) if validation else None
    if validation and valid is None:
        raise ConfigError(f"data.split={data.split!r} leaves no validation documents in any shard of data.paths "
                          "(each shard is split by its own document count): raise the validation share, "
                          "or set trainer.eval_every=0")
    return BlendPlan(data.split, train, valid)


class _EodOnly:
    """The part of a megatron tokenizer GPTDataset uses: the end-of-document id (no pad id: -1 is used)."""

    vocab_size = None  # shard dtype comes from the .idx header

    def __init__(self, eod: int) -> None:
        self.eod = eod
        self.unique_identifiers = {"class": "EodOnly", "eod": eod}  # part of megatron's index-cache key


def _build_split(data: DataConfig, shards: Shards, blend: SplitBlend, *, seed: int, num_samples: int,
                 cache_dir: str):
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data.seq_len,
        blend=(blend.prefixes, blend.weights),
        split=data.split,
        path_to_cache=data.cache_dir or cache_dir,
        tokenizer=_EodOnly(shards.eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    # Build this split alone: the shards of another split's blend may have no documents here.
    config.split_matrix = [m if i == blend.split.value else None for i, m in enumerate(config.split_matrix)]
    sizes = [0] * len(Split)
    sizes[blend.split.value] = num_samples
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[blend.split.value]


def build_datasets(data: DataConfig, shards: Shards, *, seed: int, train_samples: int, valid_samples: int,
                   cache_dir: str) -> tuple[GPTDataset, GPTDataset | None]:
    """The training (and validation) datasets, from ``shards.blend`` when :func:`check_blend` planned it for
    this ``data.split`` (else planned here)."""
    plan = shards.blend
    if plan is None or plan.split != data.split or (valid_samples and plan.valid is None):
        plan = check_blend(data, shards, validation=valid_samples > 0)
    train = _build_split(data, shards, plan.train, seed=seed, num_samples=train_samples, cache_dir=cache_dir)
    valid = None
    if valid_samples:
        valid = _build_split(data, shards, plan.valid, seed=seed, num_samples=valid_samples, cache_dir=cache_dir)
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
            {key: torch.stack([s[key] for s in samples[j : j + micro_batch_size]]) for key in BATCH_KEYS}
            for j in range(0, per_rank, micro_batch_size)
        ]
        step += 1
