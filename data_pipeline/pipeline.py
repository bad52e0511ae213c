"""Raw documents -> filtered, deduplicated, tokenized Megatron shards + manifest.json, as datatrove stages.

Stages, in order (each a datatrove pipeline run by one executor; a stage starts when the previous ended):

1. ``filter``         read (counting bad records) -> quality filters -> write survivors [-> exact-dedup signatures]
2. ``exact_find``     find duplicate signatures across all tasks (1 task)
3. ``exact_dedup``    drop the duplicates found [-> MinHash signatures]
4. ``minhash_buckets``, ``minhash_cluster``, ``minhash_dedup``: MinHash LSH near-deduplication
5. ``train_tokenizer`` byte-level BPE on every kept document (1 task; skipped for a given tokenizer)
6. ``tokenize``       kept documents -> ``shards/<task>_tokens.{bin,idx}``, EOS after each document, each
                      task's documents in a seeded random order (``tokenizer.shuffle_documents``)
7. ``manifest``       stats.json, then manifest.json (atomic, last)

Every stage logs to ``<output_dir>/logs/<stage>/``; datatrove marks each finished task there, so running the
same job again resumes where it stopped (and does nothing once complete).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.pipeline.dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

from common.errors import ConfigError, DataError
from common.shards import MANIFEST_NAME, Manifest
from data_pipeline.config import DataPipelineConfig
from data_pipeline.filters import build_filters, word_tokenizer
from data_pipeline.manifest import Accounted, StageCounts, WriteManifest, collect_counts
from data_pipeline.preflight import check_output_dir
from data_pipeline.readers import (Source, StageOutputReader, build_readers, check_inputs, check_text_column,
                                   first_record_fields, resolve_sources)
from data_pipeline.shard_writer import ShardWriter, shard_prefix
from data_pipeline.tokenizer import TrainBpeTokenizer

log = logging.getLogger("data_pipeline")


# SHA-1 (64-bit prefix) rather than datatrove's default xxhash: datatrove's xxhash helper needs xxhash<4
# (4.x refuses str), and the xxhash package is not a dependency of datatrove[io] anyway.
HASH = HashConfig(precision=64, hash_fc="sha1")


def document_text(doc) -> str:
    """What exact deduplication hashes. Module level: steps are pickled to worker processes."""
    return doc.text


@dataclass
class Layout:
    """Every path under one output directory."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def excluded(self) -> Path:
        return self.root / "excluded"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def kept(self) -> Path:
        """The documents that survive every filter and dedup step, one ``<task>.jsonl.gz`` per task."""
        return self.work / "kept"

    def logs(self, stage: str) -> Path:
        return self.root / "logs" / stage

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def bpe_qwen(self) -> Path:
        """bpe-qwen's vocab.json + merges.txt, written from qwen.tiktoken when that engine runs."""
        return self.root / "tokenizer_bpe_qwen"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def config(self) -> Path:
        return self.root / "pipeline_config.json"


@dataclass
class Stage:
    """One datatrove pipeline and how many tasks run it."""

    name: str
    pipeline: list
    tasks: int
    accounted: list[tuple[int, str, str]] = field(default_factory=list)
    """(step index, stage name in stats.json, reason for unlabeled drops) of the steps whose counts we report."""


def build_stages(cfg: DataPipelineConfig, layout: Layout, inputs: list[str], sources: list[Source]) -> list[Stage]:
    """The datatrove pipelines of the job, in the order they run (see the module docstring). ``sources``:
    what the readers read (:func:`data_pipeline.readers.resolve_sources` of ``inputs``)."""
    tasks = cfg.executor.tasks
    lang = cfg.filters.text_language
    per_rank = ["filter"] + (["exact_dedup"] if cfg.dedup.exact else []) + \
        (["minhash_dedup"] if cfg.dedup.minhash.enabled else [])
    # Each per-task stage writes its survivors, one file per task; the last one writes work/kept/.
    out_of = {name: layout.work / name for name in per_rank}
    out_of[per_rank[-1]] = layout.kept

    readers = build_readers(sources, text_key=cfg.input.text_key, id_key=cfg.input.id_key, limit=cfg.input.limit,
                            progress=cfg.progress)
    filters = build_filters(cfg.filters, layout.excluded)
    first = Stage("filter", [*readers, *(f for _, f in filters), JsonlWriter(str(out_of["filter"]))], tasks)
    first.accounted = [(i, "read", "other") for i in range(len(readers))]
    first.accounted += [(len(readers) + i, name, name) for i, (name, _) in enumerate(filters)]
    stages, last = [first], first

    if cfg.dedup.exact:
        exact = ExactDedupConfig(content_getter=document_text, hash_config=HASH)
        sigs, dups = layout.work / "exact_sigs", layout.work / "exact_dups"
        last.pipeline.append(ExactDedupSignature(str(sigs), config=exact))
        stages.append(Stage("exact_find", [ExactFindDedups(str(sigs), str(dups), config=exact)], 1))
        last = Stage("exact_dedup", [
            StageOutputReader(str(out_of["filter"]), doc_progress=cfg.progress),
            ExactDedupFilter(str(dups), config=exact, exclusion_writer=JsonlWriter(str(layout.excluded / "exact_dedup"))),
            JsonlWriter(str(out_of["exact_dedup"])),
        ], tasks, accounted=[(1, "exact_dedup", "duplicate")])
        stages.append(last)

    if cfg.dedup.minhash.enabled:
        m = cfg.dedup.minhash
        mh = MinhashConfig(n_grams=m.n_grams, num_buckets=m.num_buckets, hashes_per_bucket=m.hashes_per_bucket,
                           seed=m.seed, hash_config=HASH)
        sigs, buckets, remove = (layout.work / f"minhash_{x}" for x in ("sigs", "buckets", "remove_ids"))
        source = out_of[per_rank[per_rank.index("minhash_dedup") - 1]]
        last.pipeline.append(MinhashDedupSignature(str(sigs), config=mh, language=word_tokenizer(lang)))
        stages.append(Stage("minhash_buckets", [MinhashDedupBuckets(str(sigs), str(buckets), config=mh)],
                            m.num_buckets))
        stages.append(Stage("minhash_cluster", [MinhashDedupCluster(str(buckets), str(remove), config=mh)], 1))
        last = Stage("minhash_dedup", [
            StageOutputReader(str(source), doc_progress=cfg.progress),
            MinhashDedupFilter(str(remove), exclusion_writer=JsonlWriter(str(layout.excluded / "minhash_dedup"))),
            JsonlWriter(str(layout.kept)),
        ], tasks, accounted=[(1, "minhash_dedup", "near_duplicate")])
        stages.append(last)

    tok = cfg.tokenizer
    if tok.source == "train":
        stages.append(Stage("train_tokenizer", [
            StageOutputReader(str(layout.kept), all_tasks=True),
            TrainBpeTokenizer(str(layout.tokenizer), vocab_size=tok.vocab_size, special_tokens=tok.special_tokens,
                              min_frequency=tok.min_frequency, show_progress=cfg.progress),
        ], 1))
    shuffle_seed = tok.shuffle_seed if tok.shuffle_documents else None
    if cfg.executor.kind == "local":  # every core: the tasks that run at once share them
        threads = max(1, (os.cpu_count() or 1) // min(cfg.executor.workers, tasks))
    else:
        threads = cfg.executor.slurm.cpus_per_task
    stages.append(Stage("tokenize", [
        StageOutputReader(str(layout.kept), doc_progress=cfg.progress),
        ShardWriter(str(layout.shards), str(layout.tokenizer), eos_token=tok.eos_token,
                    parse_special_tokens=tok.parse_special_tokens, backend=tok.backend, source=tok.source,
                    special_tokens=tok.special_tokens, tiktoken_path=tok.tiktoken_path,
                    bpe_qwen_folder=str(layout.bpe_qwen), threads=threads,
                    shuffle_seed=shuffle_seed),
    ], tasks))

    stages.append(Stage("manifest", [WriteManifest(
        str(layout.root), accounted=accounted(stages, layout), eos_token=tok.eos_token, source=inputs,
        shuffle_seed=shuffle_seed,
        shard_prefixes=[f"shards/{shard_prefix(rank)}" for rank in range(tasks)])], 1))
    return stages


def accounted(stages: list[Stage], layout: Layout) -> list[Accounted]:
    """Where the counts of ``stages`` live, in pipeline order."""
    return [Accounted(name, str(layout.logs(s.name)), step, reason)
            for s in stages for step, name, reason in s.accounted]


def check_survivors(done: list[Stage], layout: Layout, inputs: list[str], sources: list[Source], text_key: str) -> None:
    """After a per-task stage has run (``done``: it and every stage before it): a DataError when no document
    is left, naming the cause. A run of the later stages would only fail there, blaming the wrong step."""
    counts = collect_counts(accounted(done, layout))
    if not counts or counts[-1].kept:
        return
    again = "fix it, then re-run with data_pipeline.overwrite=true"
    read = counts[0]
    if read.kept:  # the filters or deduplication dropped every document
        steps = ", ".join(f"{c.stage} {c.read}->{c.kept}" + (f" ({_reasons(c)})" if c.dropped else "")
                          for c in counts)
        raise DataError(f"no document survived the filters and deduplication: {steps}; the dropped documents "
                        f"are in {layout.excluded}/ (loosen the filters, then re-run with data_pipeline.overwrite=true)")
    where = ", ".join(inputs)
    if not read.read:
        raise DataError(f"the reader found no records in {where} (only blank lines); {again}")
    if read.dropped.get("missing_text"):
        fields = first_record_fields(sources)
        raise DataError(
            f"the reader found no text in field {text_key!r} (data_pipeline.input.text_key) in any of the "
            f"{read.read} records of {where} ({_reasons(read)}); "
            + (f"the first record's fields: {', '.join(fields)}" if fields else "no record is a JSON object")
            + f"; {again}")
    raise DataError(f"the reader kept no document of the {read.read} records of {where} ({_reasons(read)}; the "
                    f"file and line of each in {layout.logs('filter')}/logs/); {again}")


def _reasons(counts: StageCounts) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.dropped.items(), key=lambda kv: -kv[1]))


def build_executors(cfg: DataPipelineConfig, stages: list[Stage], layout: Layout) -> list:
    """One datatrove executor per stage, each depending on the one before (local or Slurm, same stages)."""
    executors, previous = [], None
    for stage in stages:
        common = dict(pipeline=stage.pipeline, tasks=stage.tasks, logging_dir=str(layout.logs(stage.name)),
                      depends=previous, skip_completed=True)
        if cfg.executor.kind == "local":
            from datatrove.executor import LocalPipelineExecutor

            executor = LocalPipelineExecutor(**common, workers=min(cfg.executor.workers, stage.tasks))
        else:
            from datatrove.executor import SlurmPipelineExecutor

            s = cfg.executor.slurm
            executor = SlurmPipelineExecutor(
                **common, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
                mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos, venv_path=s.venv_path,
                sbatch_args=dict(s.sbatch_args) or None, job_name=f"data_{stage.name}",
                slurm_logs_folder=str(layout.root / "slurm_logs" / stage.name),
                max_array_launch_parallel=s.max_array_launch_parallel)
        executors.append(executor)
        previous = executor
    return executors


def _fingerprint(cfg: DataPipelineConfig, inputs: list[str]) -> dict:
    """The settings a finished output depends on (not: where it runs, how many workers, progress bars)."""
    data = asdict(cfg)
    data["input"]["paths"] = inputs
    for key in ("overwrite", "progress", "output_dir"):
        data.pop(key)
    data["tokenizer"].pop("backend")  # every engine writes the same ids
    if not cfg.filters.length.enabled:  # as before the length filter existed: older outputs stay resumable
        data["filters"].pop("length")
    data["executor"] = {"tasks": cfg.executor.tasks}
    return json.loads(json.dumps(data))  # as it reads back from disk (int dict keys become strings)


def _flatten(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


def prepare_output(cfg: DataPipelineConfig, layout: Layout, inputs: list[str]) -> None:
    """Start fresh (overwrite), or check that an existing output was made by the same settings."""
    if cfg.overwrite and layout.root.exists():
        log.info("data_pipeline.overwrite: emptying %s", layout.root)
        for entry in layout.root.iterdir():
            if entry.name == "hydra":  # this run's own Hydra record (conf/data_job.yaml puts it here)
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    layout.root.mkdir(parents=True, exist_ok=True)
    wanted = _fingerprint(cfg, inputs)
    if layout.config.exists():
        previous = json.loads(layout.config.read_text())
        if previous != wanted:
            old, new = dict(_flatten(previous)), dict(_flatten(wanted))
            diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise ConfigError(
                f"data_pipeline.output_dir={cfg.output_dir!r} holds a run with different settings "
                f"({', '.join(diff)}): set data_pipeline.overwrite=true to replace it, or pick another output_dir")
    else:
        layout.config.write_text(json.dumps(wanted, indent=2) + "\n")
    if not layout.manifest.exists():  # e.g. deleted by hand: let the manifest stage run again
        (layout.logs("manifest") / "completions" / "00000").unlink(missing_ok=True)


def install_tokenizer(cfg: DataPipelineConfig, layout: Layout) -> None:
    """For a tokenizer that is given rather than trained: check it, then put it at ``<output_dir>/tokenizer.json``."""
    from tokenizers import Tokenizer

    from data_pipeline.tokenizer import check_special_tokens, copy_atomic, save_atomic

    tok_cfg = cfg.tokenizer
    if tok_cfg.source == "file":
        src = Path(tok_cfg.path).expanduser().resolve()
        if not src.is_file():
            raise ConfigError(f"data_pipeline.tokenizer.path={tok_cfg.path!r} does not exist")
        try:
            tok = Tokenizer.from_file(str(src))
        except Exception as exc:  # the tokenizers library raises plain Exceptions on a bad file
            raise ConfigError(f"data_pipeline.tokenizer.path={tok_cfg.path!r} is not a tokenizer.json: {exc}") from exc
        check_special_tokens(tok, tok_cfg.special_tokens, tok_cfg.eos_token, f"data_pipeline.tokenizer.path={tok_cfg.path!r}")
        if src != layout.tokenizer:
            copy_atomic(src, layout.tokenizer)
    elif tok_cfg.source == "qwen2":
        from data_pipeline.qwen_vocab import find_qwen_tiktoken, qwen2_tokenizer

        path = tok_cfg.tiktoken_path or find_qwen_tiktoken()
        tok = qwen2_tokenizer(path)
        check_special_tokens(tok, tok_cfg.special_tokens, tok_cfg.eos_token, f"the Qwen2 tokenizer from {path}")
        save_atomic(tok, layout.tokenizer)
    check_backend(tok_cfg)


def check_backend(tok_cfg) -> None:
    """An engine named explicitly must be installed (ConfigError otherwise); log the one 'auto' picks."""
    from data_pipeline.encoders import available, resolve_backend

    if tok_cfg.backend != "auto":
        if reason := available(tok_cfg.backend):
            raise ConfigError(f"data_pipeline.tokenizer.backend={tok_cfg.backend!r} cannot run: {reason}")
    log.info("data_pipeline.tokenizer.backend=%r: the tokenize stage encodes with %s", tok_cfg.backend,
             resolve_backend(tok_cfg.backend, tok_cfg.source))


@dataclass
class Summary:
    """What a run produced: per-stage counts, and the manifest (None when submitted to Slurm)."""

    output_dir: Path
    stages: list[StageCounts]
    manifest: Manifest | None
    slurm_jobs: list[str] = field(default_factory=list)
    """Slurm job ids, one per stage that had work left (executor.kind='slurm'); the last writes the manifest."""

    @classmethod
    def load(cls, output_dir: Path) -> "Summary":
        layout = Layout(output_dir)
        stats = json.loads(layout.stats.read_text())
        stages = [StageCounts(**s) for s in stats["stages"]]
        return cls(layout.root, stages, Manifest.read(layout.manifest))

    def table(self) -> str:
        if self.manifest is None:
            return (f"submitted to Slurm as job(s) {', '.join(self.slurm_jobs) or '(none: all done)'}; the last one "
                    f"writes {self.output_dir / 'manifest.json'}")
        rows = [("stage", "read", "kept", "dropped", "reasons")]
        for s in self.stages:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(s.dropped.items(), key=lambda kv: -kv[1]))
            rows.append((s.stage, str(s.read), str(s.kept), str(sum(s.dropped.values())), reasons))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join([r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in (1, 2, 3)), r[4]]).rstrip()
                 for r in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        m = self.manifest
        lines.append(f"\n{m.documents} documents, {m.tokens} tokens in {len(m.shards)} shard(s) ({m.dtype}); "
                     f"vocab {m.vocab_size}, eod_id {m.eod_id}")
        lines.append(f"manifest: {self.output_dir / 'manifest.json'}")
        return "\n".join(lines)


def run_pipeline(cfg: DataPipelineConfig) -> Summary:
    """Run (or resume) the whole job described by ``cfg``; return its counts and manifest.

    Raises ConfigError for a bad input path, tokenizer file, an output directory that cannot be written or was
    made by other settings; DataError (before any work) for a Parquet file without the text column, and (locally,
    as soon as the stage that dropped them has run) when no document is left.
    """
    inputs = check_inputs(list(cfg.input.paths))
    sources = resolve_sources(inputs, cfg.input.format)
    check_text_column(sources, cfg.input.text_key)
    layout = Layout(check_output_dir(cfg.output_dir))
    prepare_output(cfg, layout, inputs)
    install_tokenizer(cfg, layout)
    stages = build_stages(cfg, layout, inputs, sources)
    executors = build_executors(cfg, stages, layout)
    log.info("data pipeline: %s -> %s (%s)", ", ".join(inputs), layout.root, " -> ".join(s.name for s in stages))
    if cfg.executor.kind == "slurm":
        executors[-1].run()  # submits every stage, each job depending on the one before
        jobs = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
        if not jobs and layout.manifest.exists():  # nothing left to do
            return Summary.load(layout.root)
        return Summary(layout.root, [], None, slurm_jobs=jobs)
    for i, (stage, executor) in enumerate(zip(stages, executors)):
        executor.run()  # its dependency already ran; finished tasks are skipped
        if stage.accounted:
            check_survivors(stages[:i + 1], layout, inputs, sources, cfg.input.text_key)
    return Summary.load(layout.root)
