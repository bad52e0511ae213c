"""The tokenizer: a Qwen2-style byte-level BPE (trained here, loaded, or Qwen2's own).

Qwen2's tokenizer.json: NFC normaliser; pre-tokenizer = Split(Qwen2 regex, isolated) then
ByteLevel(add_prefix_space=False, use_regex=False); ByteLevel decoder; regular tokens 0..N-1 followed by the
control tokens (``<|endoftext|>`` = N). A trained tokenizer has the same layout: BPE is trained without
special tokens (so none lands among the low ids, where the trainer would put them) and the control tokens
are appended after the learned vocabulary.

The shard writer is :mod:`data_pipeline.shard_writer`, the shard format :mod:`common.shards`. This module
imports no other module of the package (encoders and qwen_vocab import it).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.typeshelper import StatHints
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from common.errors import ConfigError

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen2's pre-tokenizer regex (as in its tokenizer.json and dashscope's qwen.tiktoken loader)."""


def qwen2_pipeline(model: models.BPE) -> Tokenizer:
    """A Tokenizer around ``model`` with Qwen2's normaliser, pre-tokenizer, decoder and post-processor."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe(texts: Iterable[str], *, vocab_size: int, special_tokens: list[str], min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with Qwen2's pre-tokenization; ``vocab_size`` includes ``special_tokens``.

    All 256 byte symbols are in the vocabulary (no unknown token can occur); the special tokens get the ids
    right after the learned ones, in the order given.
    """
    tok = qwen2_pipeline(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens), min_frequency=min_frequency, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(special_tokens))
    return tok


def check_special_tokens(tok: Tokenizer, special_tokens: list[str], eos_token: str, where: str) -> None:
    for token in special_tokens:
        if tok.token_to_id(token) is None:
            raise ConfigError(f"{where} has no {token!r} token (data_pipeline.tokenizer.special_tokens)")
    if tok.token_to_id(eos_token) is None:
        raise ConfigError(f"{where} has no {eos_token!r} token (data_pipeline.tokenizer.eos_token)")


def save_atomic(tok: Tokenizer, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TrainBpeTokenizer(PipelineStep):
    """Trains the byte-level BPE on every document it is given and saves it (one task: it sees all text)."""

    name = "🔤 Train byte-level BPE"
    type = "🔢 - TOKENIZER"

    def __init__(self, output_path: str, *, vocab_size: int, special_tokens: list[str], min_frequency: int,
                 show_progress: bool = False) -> None:
        super().__init__()
        self.output_path = output_path
        self.vocab_size = vocab_size
        self.special_tokens = list(special_tokens)
        self.min_frequency = min_frequency
        self.show_progress = show_progress

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if world_size != 1:
            raise ValueError(f"{self.name} must run as a single task (it needs all the text), got {world_size}")

        def texts():
            for doc in data or ():
                self.stat_update(StatHints.total)
                self.stat_update("chars", value=len(doc.text))
                yield doc.text

        with self.track_time(unit="task"):
            tok = train_bpe(texts(), vocab_size=self.vocab_size, special_tokens=self.special_tokens,
                            min_frequency=self.min_frequency, show_progress=self.show_progress)
        if not self.stats[StatHints.total].total:
            raise RuntimeError("no document is left to train the tokenizer on: the filters and deduplication "
                               "dropped them all (per-stage counts: logs/<stage>/stats/)")
        self.stat_update("vocab_size", value=tok.get_vocab_size(with_added_tokens=True), unit="task")
        save_atomic(tok, Path(self.output_path))
        return
        yield  # a generator that yields nothing: the last step of its stage


def load_for_encoding(path: Path, *, parse_special_tokens: bool = False) -> Tokenizer:
    """The tokenizer exactly as the shard writer uses it (for checks and tests), without the EOS append."""
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = not parse_special_tokens
    return tok
