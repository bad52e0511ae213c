"""One small end-to-end run of the data pipeline, shared by the tests that check its outputs."""
from __future__ import annotations

import random

import pytest

from data_pipeline.config import DedupConfig, ExecutorConfig
from data_pipeline.testing import prose, small_config, write_corpus

VOCAB = 1000
SPECIAL_TEXT = "A literal <|endoftext|> marker sits in this sentence and must not end the document."
BAD_LINES = ['{"id": "broken", "text": "unterminated', '[1, 2, 3]', '{"id": "no-text", "body": "x"}',
             '{"id": "empty-text", "text": ""}']


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """Two input files, two tasks. a.jsonl: 30 good docs + 4 exact copies + 3 filter fodder + 4 bad records;
    b.jsonl: 20 good docs + 2 exact copies + 3 copies of a's docs (cross-file) + 1 doc with a literal
    control token + 3 filter fodder."""
    from data_pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    a = write_corpus(root / "in" / "a.jsonl", good=30, exact_dups=4, seed=0, extra_lines=BAD_LINES)
    special = prose(random.Random(99)) + "\n" + SPECIAL_TEXT
    b = write_corpus(root / "in" / "b.jsonl", good=20, exact_dups=2, seed=1,
                     extra_texts=[*a["texts"][:3], special])
    cfg = small_config([root / "in"], root / "out", vocab_size=VOCAB, executor=ExecutorConfig(tasks=2, workers=1),
                       dedup=DedupConfig(exact=True))
    summary = run_pipeline(cfg)
    expected = {
        "records": a["records"] + b["records"],
        "bad_json": 2, "missing_text": 2,
        "filtered": 6,
        "exact_dups": 4 + 2 + 3,
        "kept_texts": sorted(a["texts"] + b["texts"] + [special]),
    }
    return {"cfg": cfg, "summary": summary, "out": root / "out", "expected": expected}
