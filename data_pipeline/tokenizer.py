"""The tokenizer: a Qwen2-style byte-level BPE (trained here, loaded, or Qwen2's own), and the shard writer.

Qwen2's tokenizer.json: NFC normaliser; pre-tokenizer = Split(Qwen2 regex, isolated) then
ByteLevel(add_prefix_space=False, use_regex=False); ByteLevel decoder; regular tokens 0..N-1 followed by the
control tokens (``<|endoftext|>`` = N). A trained tokenizer has the same layout: BPE is trained without
special tokens (so none lands among the low ids, where the trainer would put them) and the control tokens
are appended after the learned vocabulary.
"""
from __future__ import annotations

import contextlib

import hashlib
import os
import shutil
import struct
import time
from array import array
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.tokens.megatron_tokenizer import MegatronDocumentTokenizer, get_output_filename
from datatrove.utils.batching import batched
from datatrove.utils.logging import logger
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


_IDX_HEADER = b"MMIDIDX\x00\x00"
_COPY_BUFFER = 8 << 20  # bytes gathered before each write of the shuffled copy


def shard_order(documents: int, seed: int | None, rank: int) -> np.ndarray:
    """Which input document each position of task ``rank``'s shard holds: ``shard[i]`` is input document
    ``shard_order(...)[i]`` (the order the task read its documents in). ``seed`` None = input order.

    A seeded permutation of ``documents`` (numpy's PCG64 seeded with ``[seed, rank]``): the same seed, rank
    and document count give the same order, on any machine and in any re-run.
    """
    if seed is None:
        return np.arange(documents, dtype=np.int64)
    return np.random.default_rng([seed, rank]).permutation(documents).astype(np.int64)


def write_idx(folder, filename: str, lengths: np.ndarray, token_size: int, upload_block_size: int | None) -> None:
    """``<filename>.idx`` in megatron-core's format (as datatrove's MegatronTokenizedFile writes it, one
    sequence per document), written to ``<filename>.idx.tmp`` then renamed: an .idx on disk is complete.

    Not datatrove's writer: it takes the lengths of the documents as they come and writes the .idx at once,
    while a shuffled shard's lengths are known only after the copy, and must be published last."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= token_size
    tmp = f"{filename}.idx.tmp"
    with folder.open(tmp, mode="wb", block_size=upload_block_size) as f:
        f.write(_IDX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", 4 if token_size == 4 else 8))  # megatron-core's DType code
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(lengths) + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
    folder.mv(tmp, f"{filename}.idx")


class ShardWriter(MegatronDocumentTokenizer):
    """datatrove's MegatronDocumentTokenizer (Megatron .bin/.idx per task, EOS appended per document), where a
    control token written literally inside a document is, by default, tokenized as plain text, and the
    documents are written in a seeded random order (``shuffle_seed``; None = input order).

    The ids come from the encoder ``backend`` names (:mod:`data_pipeline.encoders`; 'auto' is resolved here,
    in the task): every engine yields tokenizer.json's ids, so the shards are byte-identical whichever runs.
    A batch is written with one ``write`` (datatrove writes one numpy array per document).

    Shuffling streams: the task writes its tokens in input order to ``<name>.unshuffled.bin`` (no .idx, so
    nothing reads it as a dataset), then copies the documents in :func:`shard_order` to ``<name>.bin`` and
    deletes the temporary file; memory holds 8-24 bytes per document (lengths, offsets, permutation), never
    the tokens. Any stale ``<name>.idx`` is deleted first and the new one is written last (temp + rename), so a
    task killed mid-way leaves no .bin/.idx pair that looks complete; datatrove redoes the task on resume,
    and the manifest stage (run only once every task is marked complete) checks the counts.
    """

    def __init__(self, output_folder: str, tokenizer_path: str, *, eos_token: str, parse_special_tokens: bool,
                 batch_size: int = 1000, backend: str = "hf", source: str = "train",
                 special_tokens: list[str] = (), tiktoken_path: str | None = None,
                 bpe_qwen_folder: str | None = None, threads: int = 1, shuffle_seed: int | None = None) -> None:
        super().__init__(output_folder, save_filename=None, tokenizer_name_or_path=tokenizer_path,
                         eos_token=eos_token, batch_size=batch_size)
        self.parse_special_tokens = parse_special_tokens
        self.backend = backend
        self.source = source
        self.special_tokens = list(special_tokens) or [eos_token]
        self.tiktoken_path = tiktoken_path
        self.bpe_qwen_folder = bpe_qwen_folder
        self.threads = threads
        self.shuffle_seed = shuffle_seed
        self._rank = 0

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """tokenizer.json as the hf engine runs it (no EOS template: the writer appends the EOS)."""
        tok = Tokenizer.from_file(self.tokenizer_name_or_path)
        tok.encode_special_tokens = not self.parse_special_tokens
        return tok

    @cached_property
    def encoder(self):
        from data_pipeline.encoders import (
            HFEncoder,
            build_encoder,
            documents_per_engine,
            resolve_backend,
        )

        t0 = time.perf_counter()
        backend = resolve_backend(self.backend, self.source)
        tiktoken_path = self.tiktoken_path
        if backend != "hf" and tiktoken_path is None:
            from data_pipeline.qwen_vocab import find_qwen_tiktoken

            tiktoken_path = find_qwen_tiktoken()
        encoder = build_encoder(backend, tokenizer_path=self.tokenizer_name_or_path, threads=self.threads,
                                parse_special_tokens=self.parse_special_tokens, specials=self.special_tokens,
                                tiktoken_path=tiktoken_path, bpe_qwen_folder=self.bpe_qwen_folder,
                                hf=HFEncoder(self.tokenizer))
        load = time.perf_counter() - t0
        self.stat_update("encoder_load_s", value=load, unit="task")
        chain = " -> ".join(documents_per_engine(encoder))
        logger.info(f"tokenize: encoder {chain} (data_pipeline.tokenizer.backend={self.backend!r}; the "
                    f"documents an engine does not take go to the next), loaded in {load:.1f} s")
        return encoder

    def write_tokens(self, data: DocumentsPipeline, filename: str) -> array:
        """Write ``<filename>.bin``/.idx; return the documents' lengths in tokens (EOS included), in input order."""
        from data_pipeline.encoders import documents_per_engine

        encoder = self.encoder  # loaded before the clock runs, like datatrove's tokenizer
        folder = self.output_folder
        shuffle = self.shuffle_seed is not None
        for name in (f"{filename}.idx", f"{filename}.idx.tmp"):  # a stale .idx must never pair with a new .bin
            if folder.exists(name):
                folder.rm(name)
        first = f"{filename}.unshuffled.bin" if shuffle else f"{filename}.bin"
        eos = self.tokenizer.token_to_id(self.eos_token)
        # the bytes numpy would write: little-endian int32 (vocabulary > 65,536) or uint16
        eos_bytes = array("i" if self.token_size == 4 else "H", [eos]).tobytes()
        lengths = array("q")
        with folder.open(first, mode="wb", block_size=self.upload_block_size) as out:
            for batch in batched(data, self.batch_size):
                with self.track_time(unit="batch"):
                    texts = [doc.text for doc in batch]
                    if self.token_size == 4:
                        docs = encoder.encode_batch_int32(texts)
                    else:
                        docs = [array("H", ids).tobytes() for ids in encoder.encode_batch(texts)]
                    out.write(eos_bytes.join(docs) + eos_bytes)
                    for d in docs:
                        n = len(d) // self.token_size + 1
                        lengths.append(n)
                        self.stat_update("tokens", value=n)
        for name, count in documents_per_engine(encoder).items():
            self.stat_update(f"documents_{name}", value=count, unit="task")
        sizes = np.frombuffer(lengths, dtype=np.int64) if lengths else np.zeros(0, dtype=np.int64)
        order = shard_order(len(sizes), self.shuffle_seed, self._rank)
        if shuffle:
            with self.track_time(unit="task"):
                self._copy_in_order(first, f"{filename}.bin", sizes, order)
            folder.rm(first)
        write_idx(folder, filename, sizes[order], self.token_size, self.upload_block_size)
        return lengths

    def _copy_in_order(self, src: str, dst: str, sizes: np.ndarray, order: np.ndarray) -> None:
        """Copy the documents of ``src`` (lengths ``sizes``, in tokens) to ``dst`` in ``order``, streaming."""
        nbytes = (sizes * self.token_size).tolist()
        starts = ((np.cumsum(sizes) - sizes) * self.token_size).tolist()
        folder, buf = self.output_folder, bytearray()
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(folder.open(dst, mode="wb", block_size=self.upload_block_size))
            if not sum(nbytes):
                return  # an empty task: an empty .bin (and np.memmap refuses empty files)
            if folder.is_local():
                # A memory map turns each document into a slice (~0.3 us) instead of a seek + read through
                # fsspec (~8 us): the copy then costs little next to encoding.
                source = memoryview(np.memmap(folder.resolve_paths(src), dtype=np.uint8, mode="r"))

                def read(start: int, n: int):
                    return source[start:start + n]
            else:
                f = stack.enter_context(folder.open(src, mode="rb"))

                def read(start: int, n: int):
                    f.seek(start)
                    return f.read(n)
            for i in order.tolist():
                buf += read(starts[i], nbytes[i])
                if len(buf) >= _COPY_BUFFER:
                    out.write(buf)
                    buf.clear()
            out.write(buf)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        def counted():
            for doc in data or ():
                self.stat_update(StatHints.total)
                yield doc

        self._rank = rank
        prefix = get_output_filename(self.save_filename, rank, "tokens")
        logger.info(f'Tokenizing in "{prefix}" ('
                    f'{"input order" if self.shuffle_seed is None else f"shuffled, seed {self.shuffle_seed}"})...')
        if not len(self.write_tokens(counted(), prefix)):
            logger.warning("No data saved.")
        return
        yield  # a generator that yields nothing: the last step of its stage


def shard_prefix(rank: int) -> str:
    """The file prefix (no .bin/.idx) ShardWriter gives task ``rank``'s shard, relative to its folder."""
    return f"{rank:05d}_tokens"


def load_for_encoding(path: Path, *, parse_special_tokens: bool = False) -> Tokenizer:
    """The tokenizer exactly as the shard writer uses it (for checks and tests), without the EOS append."""
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = not parse_special_tokens
    return tok
