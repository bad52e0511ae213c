"""data_pipeline.filters.length: keep documents by length (e.g. a long-document output for a long-context blend)."""
from __future__ import annotations

import json
import random

import pytest
from datatrove.data import Document

from common.errors import ConfigError
from data_pipeline.config import FiltersConfig, LengthFilterConfig
from data_pipeline.filters import LengthFilter, build_filters
from data_pipeline.testing import no_rule_filters, prose, read_jsonl_gz, small_config


def test_length_filter_keeps_the_range_and_names_the_drop_reason():
    f = LengthFilter(min_chars=10, max_chars=20)
    assert f.filter(Document(text="x" * 9, id="a")) == (False, "too_short")
    assert f.filter(Document(text="x" * 10, id="b")) is True
    assert f.filter(Document(text="x" * 20, id="c")) is True
    assert f.filter(Document(text="x" * 21, id="d")) == (False, "too_long")
    assert LengthFilter(min_chars=10).filter(Document(text="x" * 10**6, id="e")) is True  # no upper bound


def test_length_filter_runs_first_when_enabled(tmp_path):
    filters = FiltersConfig(length=LengthFilterConfig(enabled=True, min_chars=5))
    assert [name for name, _ in build_filters(filters, tmp_path)][0] == "length"
    assert "length" not in [name for name, _ in build_filters(FiltersConfig(), tmp_path)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_chars=-1), "data_pipeline.filters.length.min_chars must be >= 0"),
    (dict(max_chars=0), "data_pipeline.filters.length.max_chars must be >= 1"),
    (dict(min_chars=100, max_chars=50), "data_pipeline.filters.length.max_chars=50 is below min_chars=100"),
])
def test_bad_length_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LengthFilterConfig(enabled=True, **kwargs)


def test_a_long_document_output_holds_only_the_long_documents(tmp_path):
    """A data-stage run with filters.length.min_chars keeps exactly the long documents (the long mixture's
    source); the short ones are in excluded/length/ with their reason."""
    from data_pipeline import run_pipeline

    rng = random.Random(3)
    short = [" ".join(prose(rng).split()[:20]) for _ in range(6)]
    long = [prose(rng, paragraphs=12) for _ in range(5)]
    assert max(map(len, short)) < 1000 < min(map(len, long))
    src = tmp_path / "in" / "docs.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(short + long)))
    filters = no_rule_filters()
    filters.length = LengthFilterConfig(enabled=True, min_chars=1000)
    run_pipeline(small_config([src.parent], tmp_path / "out", vocab_size=400, filters=filters))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sum(s["documents"] for s in manifest["shards"]) == len(long)
    dropped = [r for f in sorted((tmp_path / "out" / "excluded" / "length").glob("*.jsonl.gz"))
               for r in read_jsonl_gz(f)]
    assert sorted(r["text"] for r in dropped) == sorted(short)
    assert {r["metadata"]["filter_reason"] for r in dropped} == {"too_short"}
