"""The last stage: per-stage counts (stats.json) and the contract with the trainer (manifest.json).

manifest.json is a :class:`common.shards.Manifest` (its fields, types and version are defined there, where
the trainer reads it); this stage fills it from the shards' .idx headers and the tokenizer. It is written
last, through a temporary file and a rename: a manifest on disk always points at complete shards.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.stats import PipelineStats
from datatrove.utils.typeshelper import StatHints
from tokenizers import Tokenizer

from common.shards import MANIFEST_NAME, Manifest, ShardEntry, atomic_write_json, read_index, token_dtype
from data_pipeline.tokenizer import sha256_of


@dataclass
class StageCounts:
    """One stage's document counts: ``read == kept + sum(dropped.values())``."""

    stage: str
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "StageCounts") -> "StageCounts":
        dropped = dict(self.dropped)
        for reason, n in other.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
        return StageCounts(self.stage, self.read + other.read, self.kept + other.kept, dropped)


@dataclass(frozen=True)
class Accounted:
    """Where a stage's counts live: step ``step`` of the datatrove stage logged in ``logdir``."""

    stage: str
    logdir: str
    step: int
    default_reason: str = "other"
    """Reason for drops the step did not label (datatrove's dedup steps, plain-bool filters)."""


def _total(metric) -> int:
    """A datatrove metric's total, whether loaded from disk (int or dict) or summed (MetricStats)."""
    if isinstance(metric, dict):
        metric = metric.get("total", 0)
    return int(round(getattr(metric, "total", metric)))


def stage_counts(acc: Accounted, merged: PipelineStats) -> StageCounts:
    stats = merged.stats[acc.step].stats
    dropped_total = _total(stats[StatHints.dropped])
    reasons = {key.removeprefix("dropped_"): _total(m) for key, m in stats.items()
               if key.startswith("dropped_") and _total(m) > 0}
    unlabeled = dropped_total - sum(reasons.values())
    if unlabeled:
        reasons[acc.default_reason] = reasons.get(acc.default_reason, 0) + unlabeled
    return StageCounts(acc.stage, _total(stats[StatHints.total]), _total(stats[StatHints.forwarded]), reasons)


def merged_stats(logdir: Path) -> PipelineStats:
    """The sum of every task's stats of one datatrove stage (also tasks finished in an earlier run)."""
    merged = PipelineStats()
    for path in sorted((logdir / "stats").glob("*.json")):
        merged = merged + PipelineStats.from_json(json.loads(path.read_text()))
    return merged


def collect_counts(accounted: list[Accounted]) -> list[StageCounts]:
    """Per-stage counts in pipeline order; entries naming the same stage (several readers) are summed."""
    cache: dict[str, PipelineStats] = {}
    out: dict[str, StageCounts] = {}
    for acc in accounted:
        if acc.logdir not in cache:
            cache[acc.logdir] = merged_stats(Path(acc.logdir))
        counts = stage_counts(acc, cache[acc.logdir])
        out[acc.stage] = out[acc.stage] + counts if acc.stage in out else counts
    return list(out.values())


def build_manifest(out_dir: Path, *, shard_prefixes: list[str], eos_token: str, source: list[str],
                   stages: list[StageCounts], shuffle_seed: int | None = None) -> tuple[Manifest, dict]:
    tok_path = out_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path))
    shards, dtypes = [], set()
    for prefix in shard_prefixes:
        index = read_index(out_dir / prefix)
        dtypes.add(index.dtype.name)
        if index.documents:  # a task that kept nothing writes an empty shard: not worth a dataset
            shards.append(ShardEntry(prefix, index.documents, index.tokens))
    if len(dtypes) > 1:
        raise RuntimeError(f"shards in {out_dir} disagree on dtype: {sorted(dtypes)}")
    documents = sum(s.documents for s in shards)
    tokens = sum(s.tokens for s in shards)
    if stages and documents != stages[-1].kept:
        raise RuntimeError(f"the shards hold {documents} documents but the {stages[-1].stage!r} stage kept "
                           f"{stages[-1].kept}: a stage's output is incomplete")
    stages = [*stages, StageCounts("tokenize", read=documents, kept=documents)]
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    manifest = Manifest(
        tokenizer="tokenizer.json",
        vocab_size=vocab_size,
        eod_id=tok.token_to_id(eos_token),
        dtype=dtypes.pop() if dtypes else token_dtype(vocab_size).name,
        shards=shards,
        tokenizer_sha256=sha256_of(tok_path),
        source=", ".join(source),
        sources=list(source),
        documents=documents,
        tokens=tokens,
        special_tokens={t.content: i for i, t in sorted(tok.get_added_tokens_decoder().items()) if t.special},
        stats="stats.json",
        shuffled=shuffle_seed is not None,
        shuffle_seed=shuffle_seed,
    )
    stats = {"stages": [asdict(s) for s in stages], "documents": documents, "tokens": tokens,
             "vocab_size": vocab_size}
    return manifest, stats


class WriteManifest(PipelineStep):
    """Writes stats.json, then manifest.json (last, atomically). Runs as one task after every other stage."""

    name = "📜 Manifest"
    type = "💽 - WRITER"

    def __init__(self, out_dir: str, *, accounted: list[Accounted], shard_prefixes: list[str], eos_token: str,
                 source: list[str], shuffle_seed: int | None = None) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.accounted = accounted
        self.shard_prefixes = shard_prefixes
        self.eos_token = eos_token
        self.source = source
        self.shuffle_seed = shuffle_seed

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        out = Path(self.out_dir)
        stages = collect_counts(self.accounted)
        manifest, stats = build_manifest(out, shard_prefixes=self.shard_prefixes, eos_token=self.eos_token,
                                         source=self.source, stages=stages, shuffle_seed=self.shuffle_seed)
        atomic_write_json(out / "stats.json", stats)
        if not manifest.shards:
            raise RuntimeError(f"no document survived the filters and deduplication: nothing to train on "
                               f"(per-stage counts in {out / 'stats.json'}); no manifest written")
        manifest.write(out / MANIFEST_NAME)
        self.stat_update("shards", value=len(manifest.shards), unit="task")
        return
        yield
