"""The trained byte-level BPE: Qwen2 pre-tokenization, special-token layout, loading a given tokenizer."""
from __future__ import annotations

import pytest
import regex
from tokenizers import Tokenizer

from common.errors import ConfigError
from data_pipeline.config import TokenizerConfig
from data_pipeline.tokenizer import QWEN2_PATTERN, train_bpe

pytestmark = pytest.mark.timeout(60)

SAMPLE = ["Hello world, it's 2024! Don't stop.\n\n  Indented\tline   with   gaps\r\n", "你好，世界！ 数字 12345 🎉🎉",
          "def f(x):\n    return {'a': x}  # comment\n"] * 20


def test_pre_tokenizer_splits_like_the_qwen2_regex():
    from data_pipeline.qwen_vocab import _bytes_to_unicode

    tok = train_bpe(SAMPLE, vocab_size=300, special_tokens=["<|endoftext|>"])
    table = _bytes_to_unicode()
    for text in SAMPLE[:3]:
        pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        expected = ["".join(table[b] for b in piece.encode()) for piece in regex.findall(QWEN2_PATTERN, text)]
        assert pieces == expected


def test_special_tokens_come_after_the_learned_vocabulary():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_bpe(SAMPLE, vocab_size=400, special_tokens=specials)
    n = tok.get_vocab_size(with_added_tokens=False)
    assert 256 < n <= 397
    assert [tok.token_to_id(t) for t in specials] == [n, n + 1, n + 2]
    assert all(tok.id_to_token(i) not in specials for i in range(n))
    text = SAMPLE[1]
    assert tok.decode(tok.encode(text).ids) == text


def test_given_tokenizer_file_is_checked_and_used(tmp_path):
    from data_pipeline import run_pipeline
    from data_pipeline.config import DedupConfig, MinhashConfig
    from data_pipeline.testing import no_rule_filters, small_config, write_corpus

    write_corpus(tmp_path / "in.jsonl", good=8, exact_dups=0)
    given = tmp_path / "given.json"
    train_bpe(SAMPLE, vocab_size=350, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(str(given))
    cfg = small_config([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer=TokenizerConfig(source="file", path=str(given)),
                       filters=no_rule_filters(), dedup=DedupConfig(minhash=MinhashConfig(enabled=False)))
    summary = run_pipeline(cfg)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == given.read_bytes()
    assert summary.manifest.eod_id == Tokenizer.from_file(str(given)).token_to_id("<|endoftext|>")
    assert [s.stage for s in summary.stages][-1] == "tokenize"
    assert not (tmp_path / "out" / "logs" / "train_tokenizer").exists()

    no_eos = tmp_path / "no_eos.json"
    train_bpe(SAMPLE, vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"]).save(str(no_eos))
    bad = small_config([tmp_path / "in.jsonl"], tmp_path / "out2", tokenizer=TokenizerConfig(source="file", path=str(no_eos)))
    with pytest.raises(ConfigError, match=r"data_pipeline\.tokenizer\.path=.*no_eos\.json.* has no '<\|endoftext\|>'"):
        run_pipeline(bad)
