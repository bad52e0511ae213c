"""The tokenize stage's engines (data_pipeline.encoders): tiktoken and bpe-qwen give exactly the ids of the
tokenizer.json (HF) and of tiktoken, and shards written with each are byte-identical to the HF engine's."""
from __future__ import annotations

import gzip
import json
import random
import unicodedata
from pathlib import Path

import pytest

pytest.importorskip("tiktoken")
pytestmark = pytest.mark.timeout(600)  # bpe-qwen's load: ~10 CPU seconds, more on a busy machine

from common.errors import ConfigError  # noqa: E402
from data_pipeline import encoders  # noqa: E402
from data_pipeline.config import DEFAULT_CORPUS, SPECIAL_TOKENS, TokenizerConfig  # noqa: E402
from data_pipeline.qwen_vocab import find_qwen_tiktoken, qwen2_tokenizer  # noqa: E402

# tests/ is not a package: pytest puts this folder on sys.path
from test_qwen2_tokenizer import varied_texts  # noqa: E402

HAS_BPE_QWEN = encoders.available("bpe_qwen") is None
ENGINES = ["tiktoken", pytest.param("bpe_qwen", marks=pytest.mark.skipif(
    not HAS_BPE_QWEN, reason=f"bpe_qwen: {encoders.available('bpe_qwen')}"))]

# bpe-qwen 0.1.5 alone gets each of these wrong (cases found in its source, confirmed here).
BPE_QWEN_WRONG = ["'verbose start", "Final Fantasy Ⅻ", "   leading\n\n\n   trailing   \t\t  ", "x\n  \t",
                  "x \t", "end  \t"]
# not NFC, or with a code point Python's Unicode tables do not know: the HF engine takes these
NOT_PLAIN = ["cafe\u0301 re\u0301sume\u0301", "\u1100\u1161\u11a8 hangul jamo", "Å vs A\u030a",
             "\U00011935\U00011930 (decomposed Dives Akuru O)", "new code point \u0378 here"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    try:
        path = find_qwen_tiktoken()
    except ConfigError as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("qwen2")
    qwen2_tokenizer(path).save(str(folder / "tokenizer.json"))
    return {"tiktoken": path, "tokenizer": str(folder / "tokenizer.json"), "folder": folder}


def make(qwen, backend, *, parse_special_tokens=False):
    return encoders.build_encoder(backend, tokenizer_path=qwen["tokenizer"], specials=SPECIAL_TOKENS,
                                  parse_special_tokens=parse_special_tokens, tiktoken_path=qwen["tiktoken"],
                                  bpe_qwen_folder=str(qwen["folder"] / "bpe_qwen"))


def reference(qwen):
    return encoders._tiktoken_encoding(qwen["tiktoken"], Path(qwen["tiktoken"]).stat().st_mtime_ns)


def fuzz_texts(n: int, seed: int) -> list[str]:
    """Texts built from the structures bpe-qwen's repair passes touch: runs of spaces/tabs/newlines,
    apostrophes, quotes, contractions, digits, punctuation, trailing whitespace."""
    rng = random.Random(seed)
    words = ["the", "Cat", "it's", "don't", "I'LL", "we'VE", "über", "数据", "Привет", "x1", "42", "3.14", "(a)",
             "\"q\"", "'s", "—", "…", "#", "//", "ok.", "🎉", "x=1;", "rock'n'roll", "''", "'", "{", "=>", "é",
             "ab'cd'", "'d", "!", "$5", "_x", "0x1F", "<|endoftext|>"]
    seps = [" ", " ", "  ", "   ", "    ", "\n", "\n\n", "\t", "\t\t", " \t", "\t ", "\n    ", " \n", "\n\t",
            "\n  \n", "", "", "\r\n", "\r\n  ", "  \r\n"]
    texts = []
    for _ in range(n):
        text = "".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randint(1, 25)))
        r = rng.random()
        texts.append(text.rstrip() if r < 0.3 else rng.choice(seps) + text if r < 0.4 else text)
    return texts


@pytest.mark.parametrize("backend", ENGINES)
def test_ids_match_tiktoken_and_hf(qwen, backend):
    enc, ref = make(qwen, backend), reference(qwen)
    texts = varied_texts() + BPE_QWEN_WRONG + fuzz_texts(1500, seed=7)
    got = enc.encode_batch(texts)
    assert got == [ref.encode_ordinary(t) for t in texts]  # tiktoken: Qwen2's own tokenizer
    hf = encoders.HFEncoder.load(qwen["tokenizer"], parse_special_tokens=False)
    assert got == hf.encode_batch(texts)
    # texts that are not NFC (or not known to Python's Unicode tables) are the tokenizer.json's to encode
    assert enc.encode_batch(NOT_PLAIN) == hf.encode_batch(NOT_PLAIN)
    assert enc.encode_batch([unicodedata.normalize("NFC", t) for t in NOT_PLAIN[:3]]) == \
        [ref.encode_ordinary(unicodedata.normalize("NFC", t)) for t in NOT_PLAIN[:3]]
    counts = encoders.documents_per_engine(enc)
    assert sum(counts.values()) == len(texts) + 2 * len(NOT_PLAIN) - 2  # 3 NFC'd texts went to the fast engine
    # the fast engine did take a real share (bpe-qwen: ~1/3; the fuzz is rich in ws + apostrophe)
    assert counts[backend] > len(texts) // 4, counts


@pytest.mark.parametrize("backend", ENGINES)
def test_parse_special_tokens_matches_hf(qwen, backend):
    texts = varied_texts(60) + fuzz_texts(200, seed=3)
    assert any(s in t for t in texts for s in SPECIAL_TOKENS)
    enc = make(qwen, backend, parse_special_tokens=True)
    hf = encoders.HFEncoder.load(qwen["tokenizer"], parse_special_tokens=True)
    got = enc.encode_batch(texts)
    assert got == hf.encode_batch(texts)
    assert 151643 in sum(got, [])  # control tokens were parsed


def test_bpe_qwen_guard_rejects_exactly_what_it_must():
    for text in BPE_QWEN_WRONG + NOT_PLAIN + ["x \u00b2", "a\u00a0\u00a0b", "'ſ", "𝟏 one"]:
        assert not encoders.bpe_qwen_safe(text), repr(text)
    for text in ["", "plain ascii", "it's fine", "two  spaces\tand\t\ttabs\n    indent", "数据 🎉 Привет", "x\n\n"]:
        assert encoders.bpe_qwen_safe(text), repr(text)
    assert encoders.plain("数据 🎉") and not encoders.plain("cafe\u0301")


@pytest.mark.skipif(not HAS_BPE_QWEN, reason="bpe-qwen==0.1.5 is not installed")
def test_bpe_qwen_is_exact_where_the_guard_admits_and_wrong_where_it_does_not(qwen):
    enc, ref = make(qwen, "bpe_qwen"), reference(qwen)
    raw = enc.tokenizer.encode_batch_parallel
    texts = fuzz_texts(3000, seed=11)
    admitted = [t for t in texts if encoders.bpe_qwen_safe(t)]
    assert len(admitted) > 600
    assert [list(x) for x in raw(admitted, 1)] == [ref.encode_ordinary(t) for t in admitted]
    # the guard is not idle: bpe-qwen alone is wrong on these (so the routed encoder's parity is earned)
    assert all(list(x) != ref.encode_ordinary(t) for t, x in zip(BPE_QWEN_WRONG, raw(BPE_QWEN_WRONG, 1)))


def test_backend_choice_and_availability(monkeypatch):
    from data_pipeline.pipeline import check_backend

    assert encoders.resolve_backend("auto", "train") == "hf"
    assert encoders.resolve_backend("auto", "qwen2") == "tiktoken"
    assert encoders.resolve_backend("bpe_qwen", "qwen2") == "bpe_qwen"
    monkeypatch.setattr(encoders, "_version", lambda dist: None)
    assert encoders.resolve_backend("auto", "qwen2") == "hf"
    with pytest.raises(ConfigError, match=r"data_pipeline\.tokenizer\.backend='bpe_qwen' cannot run: bpe-qwen==0\.1\.5"):
        check_backend(TokenizerConfig(source="qwen2", backend="bpe_qwen"))


def _tokenize_stage(qwen, kept: Path, out: Path, backend: str) -> tuple[bytes, bytes, dict]:
    """The pipeline's tokenize stage (reader + ShardWriter, one task, in this process)."""
    from data_pipeline.readers import StageOutputReader
    from data_pipeline.shard_writer import ShardWriter

    writer = ShardWriter(str(out), qwen["tokenizer"], eos_token="<|endoftext|>", parse_special_tokens=False,
                         backend=backend, source="qwen2", special_tokens=SPECIAL_TOKENS,
                         tiktoken_path=qwen["tiktoken"], bpe_qwen_folder=str(qwen["folder"] / "bpe_qwen"))
    for _ in writer.run(StageOutputReader(str(kept)).run(None, 0, 1), 0, 1):
        pass
    stats = {k: v.total for k, v in writer.stats.stats.items()}
    return (out / "00000_tokens.bin").read_bytes(), (out / "00000_tokens.idx").read_bytes(), stats


def test_shards_are_byte_identical_across_engines(qwen, tmp_path):
    """The shipped corpus (7 languages, 1049 documents) through the tokenize stage with every engine."""
    lines = Path(DEFAULT_CORPUS).read_text(encoding="utf-8").splitlines()
    (tmp_path / "kept").mkdir()
    with gzip.open(tmp_path / "kept" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        for line in lines:
            r = json.loads(line)
            f.write(json.dumps({"id": r["id"], "text": r["text"], "metadata": r.get("metadata", {})}) + "\n")
    engines = ["hf", "tiktoken"] + (["bpe_qwen"] if HAS_BPE_QWEN else [])
    shards = {b: _tokenize_stage(qwen, tmp_path / "kept", tmp_path / b, b) for b in engines}
    hf_bin, hf_idx, hf_stats = shards["hf"]
    assert hf_stats["total"] == len(lines) and hf_stats["documents_hf"] == len(lines)
    ref = reference(qwen)
    first = json.loads(lines[0])["text"]
    assert list(memoryview(hf_bin).cast("i")[:len(ref.encode_ordinary(first)) + 1]) == \
        ref.encode_ordinary(first) + [151643]
    for backend in engines[1:]:
        bin_, idx, stats = shards[backend]
        assert bin_ == hf_bin and idx == hf_idx, backend
        assert stats["tokens"] == hf_stats["tokens"]
        engines = [e for e in ("hf", "tiktoken", "bpe_qwen") if f"documents_{e}" in stats]
        assert sum(stats[f"documents_{e}"] for e in engines) == len(lines)
        assert stats[f"documents_{backend}"] > 0.9 * len(lines), stats
