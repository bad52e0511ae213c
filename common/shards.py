"""The contract between ``data_pipeline`` and ``pretrain``: ``manifest.json`` and megatron's ``.bin``/``.idx`` shards.

A data-stage output directory::

    manifest.json             :class:`Manifest` (written last, atomically: it only ever points at complete shards)
    tokenizer.json
    shards/00000_tokens.bin   token ids (``Manifest.dtype``), documents back to back, EOS after each
    shards/00000_tokens.idx   megatron-core's index: header, sequence lengths, pointers, document indices
    token_scan.json           the trainer's check: each shard's largest id, keyed by the .bin's size/mtime/inode

Both sides import this module, and it imports only numpy and :mod:`common.errors`: no torch or megatron-core
(a data-stage task starts in a second). megatron-core's ``IndexedDataset`` is what reads the shards for
training; :func:`write_index` writes its ``.idx`` layout byte for byte (tests/common/test_shards.py reads it
back with megatron-core, and this module's reader on megatron-core's writer), and :func:`check_shard` checks
one with errors that name the file, where megatron-core asserts.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from common.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
"""The manifest layout this code writes. A manifest without ``version`` (written before it existed) has the
same layout and reads as version 0; a higher version than this one is refused (a newer data_pipeline wrote it)."""
SCAN_CACHE_NAME = "token_scan.json"

IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core indexed_dataset._INDEX_HEADER
IDX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document indices: 34 bytes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
"""megatron-core ``indexed_dataset.DType`` codes -> numpy dtypes."""


# --------------------------------------------------------------------------------------------------
# manifest.json
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardEntry:
    """One shard a manifest lists."""

    prefix: str
    """Path without ``.bin``/``.idx``, relative to the manifest's directory."""
    documents: int | None = None
    tokens: int | None = None
    """Token count, EOS included (None: not recorded)."""


@dataclass(kw_only=True)
class Manifest:
    """What one data-stage output holds. Fields absent from an old manifest take the defaults below."""

    vocab_size: int
    """The tokenizer's size, special tokens included (every id in the shards is below it)."""
    eod_id: int
    """The end-of-document id written after each document."""
    shards: list[ShardEntry]
    """Non-empty shards only (a task that kept nothing is left out)."""
    dtype: str | None = None
    """Token dtype of every shard: 'uint16' (vocabulary up to 65,536) or 'int32'. None: not recorded."""
    tokenizer: str = "tokenizer.json"
    """tokenizer.json, relative to the manifest's directory."""
    tokenizer_sha256: str | None = None
    source: str = ""
    """The input paths, comma-separated (for people; ``sources`` for programs)."""
    sources: list[str] = field(default_factory=list)
    documents: int | None = None
    tokens: int | None = None
    special_tokens: dict[str, int] = field(default_factory=dict)
    stats: str | None = None
    """stats.json (per-stage counts), relative to the manifest's directory."""
    shuffled: bool = False
    shuffle_seed: int | None = None
    """Shard position ``i`` of task ``rank`` holds the task's input document
    ``shard_order(documents, shuffle_seed, rank)[i]``; None: input order."""
    version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)
    """Keys this code does not know (kept, and written back)."""

    @staticmethod
    def path_of(path: str | os.PathLike) -> Path:
        """``path`` itself if it names a .json file, else ``path/manifest.json`` (a data-stage output directory)."""
        path = Path(path)
        return path / MANIFEST_NAME if path.is_dir() or path.suffix != ".json" else path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        """The manifest at ``path`` (the file or its directory); DataError naming the file when it is missing,
        not JSON, from a newer data_pipeline, or has a field of the wrong type."""
        path = cls.path_of(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{path} is missing: `python -m data_pipeline` writes it with the token shards") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} cannot be read ({exc})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); the data pipeline writes it whole (temporary file + "
                            "rename), so it was edited or damaged since") from None
        return cls.from_dict(obj, where=str(path))

    @classmethod
    def from_dict(cls, obj, *, where: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(obj, dict):
            raise DataError(f"{where} is not a manifest (a JSON {type(obj).__name__}, not an object)")
        version = obj.get("version", 0)
        if type(version) is not int or version < 0:
            raise DataError(f"{where}: version must be a non-negative integer, got {version!r}")
        if version > MANIFEST_VERSION:
            raise DataError(f"{where} has manifest version {version}; this code reads versions up to "
                            f"{MANIFEST_VERSION}: update qwen-pretrain, or re-run the data pipeline with this one")
        known = {f.name for f in fields(cls)} - {"extra", "version"}
        for name in ("vocab_size", "eod_id", "shards"):
            if name not in obj:
                raise DataError(f"{where} has no {name!r} field (not written by `python -m data_pipeline`?)")
        values = {name: _typed(where, name, obj[name]) for name in known if name in obj}
        dtype = values.get("dtype")
        if dtype is not None and dtype not in {np.dtype(t).name for t in DTYPES.values()}:
            raise DataError(f"{where}: dtype={dtype!r} is not a megatron token dtype")
        return cls(**values, version=version, extra={k: v for k, v in obj.items() if k not in known | {"version"}})

    def to_dict(self) -> dict:
        out = {"version": self.version}
        for f in fields(self):
            if f.name in ("version", "extra"):
                continue
            value = getattr(self, f.name)
            out[f.name] = ([{k: v for k, v in vars(s).items() if v is not None} for s in value]
                           if f.name == "shards" else value)
        return {**out, **self.extra}

    def write(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (the file or its directory) through a temporary file and a rename, so a reader
        sees the old manifest or the new one, never part of one. Returns the file written."""
        path = self.path_of(path)
        atomic_write_json(path, self.to_dict())
        return path

    def shard_prefixes(self, root: str | os.PathLike) -> list[Path]:
        """Each shard's path without .bin/.idx; ``root``: the manifest's directory."""
        return [Path(root) / s.prefix for s in self.shards]


def _int(value) -> bool:
    return type(value) is int  # not bool


_CHECKS = {  # field -> (test, what it must be); None passes for every field that may be None
    "vocab_size": (lambda v: _int(v) and v > 0, "a positive integer"),
    "eod_id": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "dtype": (lambda v: isinstance(v, str), "a dtype name"),
    "tokenizer": (lambda v: isinstance(v, str), "a path"),
    "tokenizer_sha256": (lambda v: isinstance(v, str), "a hex digest"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "sources": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of paths"),
    "documents": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "tokens": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "special_tokens": (lambda v: isinstance(v, dict) and all(_int(i) for i in v.values()), "{token: id}"),
    "stats": (lambda v: isinstance(v, str), "a path"),
    "shuffled": (lambda v: isinstance(v, bool), "true or false"),
    "shuffle_seed": (lambda v: _int(v), "an integer"),
}
_NOT_NULL = ("vocab_size", "eod_id", "shards", "tokenizer", "source", "sources", "special_tokens", "shuffled")


def _typed(where: str, name: str, value):
    if name == "shards":
        if not isinstance(value, list):
            raise DataError(f"{where}: shards must be a list, got {type(value).__name__}")
        return [_shard_entry(where, i, s) for i, s in enumerate(value)]
    test, what = _CHECKS[name]
    if value is None and name not in _NOT_NULL:
        return None
    if not test(value):
        raise DataError(f"{where}: {name} must be {what}, got {value!r}")
    return value


def _shard_entry(where: str, i: int, entry) -> ShardEntry:
    if not isinstance(entry, dict) or not isinstance(entry.get("prefix"), str):
        raise DataError(f"{where}: shards[{i}] must be an object with a 'prefix' path, got {entry!r}")
    for key in ("documents", "tokens"):
        if entry.get(key) is not None and not (_int(entry[key]) and entry[key] >= 0):
            raise DataError(f"{where}: shards[{i}].{key} must be a non-negative integer, got {entry[key]!r}")
    return ShardEntry(entry["prefix"], entry.get("documents"), entry.get("tokens"))


def atomic_write_json(path: Path, obj) -> None:
    """``path`` written whole or not at all (temporary file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# .idx/.bin shards (megatron-core's IndexedDataset format, one sequence per document)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexHeader:
    """The fixed 34 bytes at the start of an .idx file."""

    path: Path
    version: int
    dtype: np.dtype
    sequences: int
    document_indices: int
    """Entries of the document index: documents + 1."""

    @property
    def expected_size(self) -> int:
        # sequence lengths (int32), pointers (int64), document indices (int64), nothing after
        return _HEADER.size + 12 * self.sequences + 8 * self.document_indices


@dataclass(frozen=True)
class ShardIndex:
    """An .idx file read and checked: its token dtype and each sequence's length in tokens."""

    prefix: Path
    dtype: np.dtype
    lengths: np.ndarray
    documents: int

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


def dtype_code(dtype) -> int:
    """megatron-core's DType code of a numpy dtype."""
    name = np.dtype(dtype).name
    for code, t in DTYPES.items():
        if np.dtype(t).name == name:
            return code
    raise ValueError(f"{name} is not a megatron token dtype")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype the shards of a ``vocab_size`` vocabulary use (as datatrove's writer chooses)."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def read_header(idx: str | os.PathLike) -> IndexHeader:
    """The header of an .idx file; DataError naming it unless it is megatron's (magic, version, dtype code)."""
    idx = Path(idx)
    with idx.open("rb") as stream:
        head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:9] != IDX_MAGIC:
        raise DataError(f"{idx} is not a megatron .idx file (its header does not start with {IDX_MAGIC!r})")
    _, version, code, sequences, document_indices = _HEADER.unpack(head)
    if version != IDX_VERSION or code not in DTYPES:
        raise DataError(f"{idx}: corrupt header (version {version}, dtype code {code}; megatron writes version "
                        f"{IDX_VERSION}, dtype codes 1-8)")
    return IndexHeader(idx, version, np.dtype(DTYPES[code]), sequences, document_indices)


def read_lengths(header: IndexHeader) -> np.ndarray:
    """Each sequence's length (int32), after checking the file is exactly as long as its header says."""
    size = header.path.stat().st_size
    if size != header.expected_size:
        raise DataError(f"{header.path} has {size} bytes, its header promises {header.expected_size} (truncated or "
                        "corrupt)")
    return np.fromfile(header.path, dtype=np.int32, count=header.sequences, offset=_HEADER.size)


def read_index(prefix: str | os.PathLike) -> ShardIndex:
    """``prefix``.idx read and checked (header, size); FileNotFoundError if there is none."""
    header = read_header(f"{prefix}.idx")
    return ShardIndex(Path(prefix), header.dtype, read_lengths(header), header.document_indices - 1)


def write_index(f, lengths, dtype) -> None:
    """Write an .idx for documents of ``lengths`` tokens (one sequence each) of ``dtype`` to the binary file
    ``f``: megatron-core's layout, as its ``_IndexWriter`` and datatrove's ``MegatronTokenizedFile`` write it.
    Publishing it (temporary name, rename) is the caller's part."""
    lengths = np.asarray(lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= itemsize
    f.write(_HEADER.pack(IDX_MAGIC, IDX_VERSION, dtype_code(dtype), len(lengths), len(lengths) + 1))
    f.write(lengths.tobytes())
    f.write(pointers.tobytes())
    f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


def read_documents(prefix: str | os.PathLike) -> list[np.ndarray]:
    """Each document's token ids (EOS included) of one shard, in shard order (reads the whole .bin)."""
    index = read_index(prefix)
    tokens = np.fromfile(f"{prefix}.bin", dtype=index.dtype)
    if len(tokens) != index.tokens:
        raise DataError(f"{prefix}.bin holds {len(tokens)} tokens, its .idx {index.tokens}")
    return np.split(tokens, np.cumsum(index.lengths[:-1], dtype=np.int64)) if len(index.lengths) else []


def shard_order(documents: int, seed: int | None, rank: int) -> np.ndarray:
    """Which input document each position of task ``rank``'s shard holds: ``shard[i]`` is input document
    ``shard_order(...)[i]`` (the order the task read its documents in). ``seed`` None = input order.

    A seeded permutation of ``documents`` (numpy's PCG64 seeded with ``[seed, rank]``): the same seed, rank
    and document count give the same order, on any machine and in any re-run.
    """
    if seed is None:
        return np.arange(documents, dtype=np.int64)
    return np.random.default_rng([seed, rank]).permutation(documents).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Checks before training
# --------------------------------------------------------------------------------------------------
def check_shard(prefix: Path, *, documents: int | None, tokens: int | None, dtype: str | None,
                manifest: Path | None = None) -> ShardIndex:
    """``prefix``.idx/.bin are a complete megatron shard that agrees with its manifest, or DataError naming the
    file. ``documents``/``tokens``/``dtype``: what the manifest says (None: not recorded). Cheap: reads the
    .idx and the .bin's size, not its tokens (:func:`largest_ids`)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for f in (idx, bin_):
        if not f.is_file():
            raise DataError(f"{f} is missing (listed in {manifest or prefix.parent / MANIFEST_NAME})")
    header = read_header(idx)
    if dtype is not None and header.dtype != np.dtype(dtype):
        raise DataError(f"{idx} stores {header.dtype} tokens but its manifest says dtype={dtype}")
    if documents is not None and (header.sequences != documents or header.document_indices != documents + 1):
        raise DataError(f"{idx}: header counts {header.sequences} documents but its manifest says {documents} "
                        "(corrupt header?)")
    index = ShardIndex(Path(prefix), header.dtype, read_lengths(header), header.document_indices - 1)
    if tokens is not None and index.tokens != tokens:
        raise DataError(f"{idx} indexes {index.tokens} tokens but its manifest says {tokens}")
    expected = index.tokens * header.dtype.itemsize
    if bin_.stat().st_size != expected:
        raise DataError(f"{bin_} has {bin_.stat().st_size} bytes, expected {expected} ({index.tokens} {header.dtype} "
                        "tokens): truncated or from another run of the data pipeline")
    return index


def max_token_id(bin_path: Path, dtype) -> int | None:
    """The largest id in a .bin (None if empty): one memory-mapped pass, about a second per GB from disk."""
    if not Path(bin_path).stat().st_size:
        return None
    return int(np.memmap(bin_path, dtype=dtype, mode="r").max())


def largest_ids(root: Path, indexes: list[ShardIndex]) -> dict[Path, int | None]:
    """Each shard's largest id, scanned once per version of its .bin: the answers are kept in
    ``root/token_scan.json`` keyed by the .bin's size, mtime and inode (and dtype): the launcher's check scans,
    the ranks' checks and later runs read the answer. A shard rewritten in a way that changes one of those is
    scanned again; a directory that cannot be written is scanned by every check."""
    cache_path = Path(root) / SCAN_CACHE_NAME
    try:
        cache = json.loads(cache_path.read_text())
        entries = cache["shards"] if cache.get("version") == 1 and isinstance(cache.get("shards"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        entries = {}  # absent, or damaged: scan again
    out, scanned, t0 = {}, [], time.perf_counter()
    for index in indexes:
        bin_ = Path(f"{index.prefix}.bin")
        st = bin_.stat()
        key = os.path.relpath(index.prefix, root)
        identity = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "dtype": index.dtype.name}
        hit = entries.get(key)
        if isinstance(hit, dict) and hit.get("file") == identity:
            out[index.prefix] = hit.get("max_id")
            continue
        out[index.prefix] = max_token_id(bin_, index.dtype)
        entries[key] = {"file": identity, "max_id": out[index.prefix]}
        scanned.append(st.st_size)
    if scanned:
        seconds = time.perf_counter() - t0
        try:  # a temporary name of its own: ranks of one job may write at once
            tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": 1, "shards": entries}, indent=1) + "\n")
            os.replace(tmp, cache_path)
            kept = f"kept in {cache_path}"
        except OSError as exc:
            kept = f"not kept ({exc}): every check scans again"
        log.info("token scan: %d shard(s), %.1f MB read in %.2f s; largest ids %s", len(scanned), sum(scanned) / 1e6,
                 seconds, kept)
    return out


def check_output(root: str | os.PathLike, manifest: Manifest | None = None, *, scan: bool = True) -> Manifest:
    """Every shard of the data-stage output at ``root``, as :func:`check_shard`, and (``scan``) no id at or
    above the manifest's ``vocab_size`` (:func:`largest_ids`). Returns the manifest; DataError naming the file."""
    root = Path(root)
    manifest = manifest if manifest is not None else Manifest.read(root)
    where = root / MANIFEST_NAME
    indexes = [check_shard(root / s.prefix, documents=s.documents, tokens=s.tokens, dtype=manifest.dtype,
                           manifest=where) for s in manifest.shards]
    if scan:
        for prefix, largest in largest_ids(root, indexes).items():
            if largest is not None and largest >= manifest.vocab_size:
                raise DataError(f"{prefix}.bin holds token id {largest}, but its manifest says vocab_size="
                                f"{manifest.vocab_size} (shards and manifest come from different tokenizers?)")
    return manifest
