"""The tokenize stage's writer: kept documents -> one megatron ``.bin``/``.idx`` shard per task.

The format (and :func:`~common.shards.shard_order`, the documented order of a shuffled shard) belongs to
:mod:`common.shards`, which the trainer reads it with; this module adds the datatrove step that encodes
documents (engines from :mod:`data_pipeline.encoders`) and publishes each shard safely.
"""
from __future__ import annotations

import contextlib
import time
from array import array
from functools import cached_property

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.tokens.megatron_tokenizer import MegatronDocumentTokenizer, get_output_filename
from datatrove.utils.batching import batched
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints
from tokenizers import Tokenizer

from common.shards import shard_order, write_index
from data_pipeline.encoders import HFEncoder, build_encoder, documents_per_engine, resolve_backend
from data_pipeline.qwen_vocab import find_qwen_tiktoken

_COPY_BUFFER = 8 << 20  # bytes gathered before each write of the shuffled copy


def write_idx(folder, filename: str, lengths: np.ndarray, token_size: int, upload_block_size: int | None) -> None:
    """``<filename>.idx`` (:func:`common.shards.write_index`) through the datatrove ``folder`` (local or fsspec),
    written to ``<filename>.idx.tmp`` then renamed: an .idx on disk is complete.

    Not datatrove's writer: it takes the lengths of the documents as they come and writes the .idx at once,
    while a shuffled shard's lengths are known only after the copy, and must be published last."""
    tmp = f"{filename}.idx.tmp"
    with folder.open(tmp, mode="wb", block_size=upload_block_size) as f:
        write_index(f, lengths, np.int32 if token_size == 4 else np.uint16)
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
        t0 = time.perf_counter()
        backend = resolve_backend(self.backend, self.source)
        tiktoken_path = self.tiktoken_path
        if backend != "hf" and tiktoken_path is None:
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
