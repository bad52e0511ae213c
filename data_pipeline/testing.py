"""Helpers for tests and demos: small synthetic corpora with known good, bad and duplicate documents."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from data_pipeline.config import DataPipelineConfig, FiltersConfig, InputConfig, TokenizerConfig

RULE_FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")

_SYLLABLES = ["ka", "lo", "mi", "ne", "ra", "tu", "so", "vel", "dor", "pen", "sta", "ric", "mon", "tal", "ber",
              "gin", "fu", "cha", "pol", "wen", "ist", "ar", "ul", "em", "qua", "zo", "bri", "ted", "lan", "mor"]
_STOP = ["the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "for", "on", "it"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def prose(rng: random.Random, *, paragraphs: int = 6) -> str:
    """English-looking text that passes the default Gopher, C4 and FineWeb rules: one paragraph per line,
    2-3 sentences each, stop words mixed in, no repeated lines."""
    lines = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(2, 3)):
            words = [rng.choice(_STOP) if rng.random() < 0.35 else _word(rng) for _ in range(rng.randint(8, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?"]))
        lines.append(" ".join(sentences))
    return "\n".join(lines)


def near_duplicate(rng: random.Random, text: str, *, edits: int = 2) -> str:
    """``text`` with a few words replaced: Jaccard similarity of its 5-grams to the original stays high."""
    words = text.split(" ")
    for _ in range(edits):
        words[rng.randrange(len(words))] = _word(rng)
    return " ".join(words)


def write_corpus(path: Path, *, good: int = 40, exact_dups: int = 5, near_dups: int = 0, seed: int = 0,
                 extra_texts: list[str] = (), extra_lines: list[str] = ()) -> dict:
    """Write a JSONL corpus and return what is in it.

    ``good`` unique documents that pass every default filter; ``exact_dups`` byte-identical copies of some of
    them; ``near_dups`` copies with two words changed; one document each that the default filters drop (too
    short, one line repeated, lorem ipsum: ids ``short``, ``repetitive``, ``lorem``); a document per
    ``extra_texts`` entry (id ``extra-<i>``); then ``extra_lines`` verbatim (e.g. broken JSON). Returns the
    counts (good, exact_dups, near_dups, bad=3, records) and the good documents' ``texts``.
    """
    rng = random.Random(seed)
    texts = [prose(rng) for _ in range(good)]
    records = [{"id": f"good-{i}", "text": t} for i, t in enumerate(texts)]
    for i in range(exact_dups):
        records.append({"id": f"dup-{i}", "text": texts[i % good]})
    for i in range(near_dups):
        records.append({"id": f"near-{i}", "text": near_duplicate(rng, texts[(i * 7) % good])})
    records.append({"id": "short", "text": "Too short to keep."})
    records.append({"id": "repetitive", "text": "\n".join(["The same line of text is here again and again."] * 20)})
    lorem = prose(rng).split("\n")
    lorem[2] = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor."
    records.append({"id": "lorem", "text": "\n".join(lorem)})
    records += [{"id": f"extra-{i}", "text": t} for i, t in enumerate(extra_texts)]
    rng.shuffle(records)
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(extra_lines)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {"good": good, "exact_dups": exact_dups, "near_dups": near_dups, "bad": 3,
            "records": len(records) + len(extra_lines), "texts": texts}


def small_config(inputs: list[Path], out: Path, *, vocab_size: int = 1000, **kwargs) -> DataPipelineConfig:
    """A quick job for tests: a small vocabulary, no progress bars."""
    kwargs.setdefault("tokenizer", TokenizerConfig(vocab_size=vocab_size))
    return DataPipelineConfig(input=InputConfig(paths=[str(p) for p in inputs]), output_dir=str(out),
                              progress=False, **kwargs)


def read_jsonl_gz(path: Path) -> list[dict]:
    """The records of one of the pipeline's ``<task>.jsonl.gz`` files ([] if the task wrote none)."""
    if not Path(path).exists():
        return []
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def no_rule_filters() -> FiltersConfig:
    """Filters with the Gopher/C4/FineWeb rules off (they import spaCy: seconds per process)."""
    filters = FiltersConfig()
    for name in RULE_FILTERS:
        getattr(filters, name).enabled = False
    return filters
