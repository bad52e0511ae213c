"""Readers: datatrove's JSONL/Parquet readers, plus the accounting this pipeline needs.

datatrove's readers skip a line that is not JSON, or a record without text, with one warning and no count,
and a line that is not UTF-8 ends the whole task. Here every input record is counted: ``total`` =
``forwarded`` + ``dropped``, with ``dropped_bad_json``, ``dropped_bad_encoding`` and ``dropped_missing_text``
as reasons (the same stat names datatrove's filters use), so the read stage conserves counts like every
other stage. Each file's drops are logged once, at the end of the file, with the first line (or row) that
had each problem.

Before any work starts, :func:`resolve_sources` turns the input paths into one reader source per format
found (``format=auto`` looks for both in a directory; files listed one by one are one source per format, so
their files are spread over the tasks as a directory's are) and :func:`check_text_column` reads every
Parquet file's schema, so a wrong ``text_key`` is one ``data error`` rather than a run that keeps nothing.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints

from common.errors import ConfigError, DataError

GLOBS = {"jsonl": "**/*.jsonl*", "parquet": "**/*.parquet"}
"""The files of each format a directory input is read from, at any depth (``*.jsonl*``: also .gz/.zst)."""


class _CountingMixin:
    """Counts each record a reader parses, and why one yields no document; logs each file's drops once.
    With ``files``, reads those paths (relative to the folder) instead of listing the folder."""

    def __init__(self, *args, files: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.files = tuple(files)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if not self.files:
            yield from super().run(data, rank, world_size)
            return
        if data:
            yield from data
        # Spread over the tasks as datatrove spreads a folder's files (files[rank::world_size]); datatrove's
        # own one-file reader would hand its file to task 0, so N listed files would all land in task 0.
        for doc in self.read_files_shard(list(self.files[rank::world_size])):
            self.update_doc_stats(doc)
            yield doc

    def read_file(self, filepath: str):
        self._issues: dict[str, list] = {}  # reason -> [count, where the first was, what was wrong]
        self._records_in_file = 0
        try:
            yield from self._read_records(filepath)
        finally:  # also when the reader stops early (input.limit)
            for reason, (n, where, detail) in self._issues.items():
                logger.warning(f"{self.data_folder.resolve_paths(filepath)}: {n} record(s) dropped as {reason} "
                               f"(first at {where}: {detail})")

    def _read_records(self, filepath: str):
        return super().read_file(filepath)  # datatrove's reader, which calls get_document_from_dict per record

    def get_document_from_dict(self, data, source_file, id_in_file):
        self.stat_update(StatHints.total)
        self._records_in_file += 1
        if not isinstance(data, dict):
            self._drop("bad_json", id_in_file, f"a JSON {type(data).__name__}, not an object")
            return None
        text = data.get(self.text_key)
        if not isinstance(text, str) or not text:
            found = "absent" if self.text_key not in data else "empty" if text == "" else type(text).__name__
            self._drop("missing_text", id_in_file, f"field {self.text_key!r} is {found}; {_fields(data)}")
            return None
        document = super().get_document_from_dict(data, source_file, id_in_file)
        self.stat_update(StatHints.forwarded)
        return document

    def _where(self, id_in_file) -> str:
        return f"record {self._records_in_file}"

    def _drop(self, reason: str, id_in_file, detail: str) -> None:
        self.stat_update(StatHints.dropped, f"dropped_{reason}")
        issue = self._issues.setdefault(reason, [0, self._where(id_in_file), detail])
        issue[0] += 1


class CountingJsonlReader(_CountingMixin, JsonlReader):
    """JsonlReader that counts, rather than only logs, undecodable lines, and keeps reading after a line
    that is not UTF-8 (it reads bytes and decodes line by line). Blank lines are not records."""

    def _read_records(self, filepath: str):
        import orjson

        with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                with self.track_time():
                    try:
                        data = orjson.loads(line)  # bytes: orjson checks the UTF-8 itself
                    except orjson.JSONDecodeError as exc:
                        self.stat_update(StatHints.total)
                        self._records_in_file += 1
                        try:
                            line.decode("utf-8")
                        except UnicodeDecodeError as bad:
                            self._drop("bad_encoding", line_no, f"not UTF-8: {bad.reason} at byte {bad.start}")
                        else:
                            self._drop("bad_json", line_no, f"not JSON: {exc}")
                        continue
                    document = self.get_document_from_dict(data, filepath, line_no)
                if document:
                    yield document

    def _where(self, id_in_file) -> str:
        return f"line {id_in_file + 1}"


class CountingParquetReader(_CountingMixin, ParquetReader):
    """ParquetReader that counts rows without text."""

    def _where(self, id_in_file) -> str:
        return f"row {self._records_in_file}"


class StageOutputReader(JsonlReader):
    """Reads the ``<task>.jsonl.gz`` files an earlier per-task stage wrote. In task ``rank``: exactly the file
    task ``rank`` wrote; with ``all_tasks=True`` (a single-task stage): every task's file, in task order. A
    task that kept no document wrote no file, which reads as empty.

    Dedup signatures number documents per task, so a later stage must see each task's documents in the
    same order; datatrove's own file sharding would shift files between tasks once one task wrote none.
    """

    def __init__(self, data_folder: str, *, all_tasks: bool = False, doc_progress: bool = False) -> None:
        # The first reader already put the input's path in each document's metadata; datatrove would resolve
        # this file's path again per document (~90 us each) only to not overwrite it.
        super().__init__(data_folder, doc_progress=doc_progress, add_file_path=False)
        self.all_tasks = all_tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        if self.all_tasks:
            names = sorted(self.data_folder.list_files(glob_pattern="[0-9][0-9][0-9][0-9][0-9].jsonl.gz"))
        else:
            name = f"{rank:05d}.jsonl.gz"
            names = [name] if self.data_folder.exists(name) else []
        for doc in self.read_files_shard(names):
            self.update_doc_stats(doc)
            yield doc


def _fields(record: dict) -> str:
    names = list(map(str, record))
    return f"fields present: {', '.join(names[:12]) + (', ...' if len(names) > 12 else '') or 'none'}"


@dataclass(frozen=True)
class Source:
    """What one reader reads, as ``kind``: the files matching ``glob`` under ``folder``, or ``files`` (paths
    relative to ``folder``, in the order they were listed) when given."""

    folder: str
    glob: str
    kind: str
    """'jsonl' or 'parquet'."""
    files: tuple[str, ...] = ()

    def names(self) -> list[str]:
        """The files this source reads, relative to ``folder``."""
        if self.files:
            return list(self.files)
        return get_datafolder(self.folder).list_files(recursive=True, glob_pattern=self.glob)


def _file_group(paths: list[str], kind: str) -> Source:
    """One source for files listed one by one: their deepest common folder, and each file relative to it."""
    scheme = paths[0].split("://", 1)[0] + "://" if "://" in paths[0] else ""
    bare = [p.removeprefix(scheme) for p in paths]
    folder = posixpath.commonpath([posixpath.dirname(p) or "/" for p in bare]) or "/"
    return Source(scheme + folder, "", kind, tuple(posixpath.relpath(p, folder) for p in bare))


def resolve_sources(paths: list[str], format: str) -> list[Source]:
    """The readers' sources for checked input paths (:func:`check_inputs`). A file is read as ``format``
    ('auto': Parquet for .parquet/.pq, else JSONL). A directory is read as every file of ``format`` under it
    (``GLOBS``); 'auto' looks for both formats, one source each. A directory without such files is a
    ConfigError that says which files were looked for."""
    # Files listed one by one: one reader per format and filesystem (bucket), placed where its first file was
    # listed, so that datatrove spreads them over the tasks (a reader per file would give each to task 0).
    sources, listed = [], {}
    for i, path in enumerate(paths):
        folder = get_datafolder(path)
        if folder.fs.isfile(folder.path):
            kind = format if format != "auto" else "parquet" if path.endswith((".parquet", ".pq")) else "jsonl"
            key = (kind, "/".join(path.split("/", 3)[:3]) if "://" in path else "")
            if key not in listed:
                listed[key] = []
                sources.append(key)
            listed[key].append(path)
            continue
        kinds = ("jsonl", "parquet") if format == "auto" else (format,)
        found = [Source(path, GLOBS[k], k) for k in kinds if folder.list_files(recursive=True, glob_pattern=GLOBS[k])]
        if not found:
            sample = sorted(folder.list_files(recursive=True))[:3]
            raise ConfigError(
                f"data_pipeline.input.paths[{i}]={path!r} holds no "
                f"{' or '.join(kinds)} files (data_pipeline.input.format={format!r} looked for "
                f"{' and '.join(GLOBS[k].removeprefix('**/') for k in kinds)} at any depth"
                + (f"; it holds e.g. {', '.join(sample)}" if sample else "") + ")")
        sources += found
    return [_file_group(listed[s], s[0]) if isinstance(s, tuple) else s for s in sources]  # key -> its reader


def check_text_column(sources: list[Source], text_key: str) -> None:
    """Every Parquet file has a column ``text_key`` (its schema says so from the footer, without reading
    rows); otherwise every row would be dropped as missing text. DataError naming the file and its columns."""
    for source in sources:
        if source.kind != "parquet":
            continue
        import pyarrow.parquet as pq  # only for Parquet input

        folder = get_datafolder(source.folder)
        for name in source.names():
            with folder.open(name, "rb") as f:
                try:
                    columns = pq.read_schema(f).names
                except Exception as exc:  # pyarrow raises ArrowInvalid (and others) for a file that is not Parquet
                    raise DataError(f"{folder.resolve_paths(name)} is not a readable Parquet file: {exc}") from exc
            if text_key not in columns:
                raise DataError(
                    f"the reader found no text column {text_key!r} (data_pipeline.input.text_key) in "
                    f"{folder.resolve_paths(name)}: its columns are {', '.join(columns) or 'none'}")


def first_record_fields(sources: list[Source], *, max_lines: int = 1000) -> list[str]:
    """The field names a user could give as ``text_key``: the columns of the first Parquet file, or the keys of
    the first JSON object in the first JSONL file (within ``max_lines`` lines). [] if none is found."""
    import orjson
    import pyarrow.parquet as pq

    for source in sources:
        folder = get_datafolder(source.folder)
        for name in source.names()[:1]:
            if source.kind == "parquet":
                with folder.open(name, "rb") as f:
                    return pq.read_schema(f).names
            with folder.open(name, "rb", compression="infer") as f:
                for _, line in zip(range(max_lines), f):
                    try:
                        data = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(data, dict):
                        return list(map(str, data))
    return []


def build_readers(sources: list[Source], *, text_key: str, id_key: str, limit: int, progress: bool) -> list:
    """One reader per source. Readers chain in a pipeline: each reads its share of its own files in every task."""
    classes = {"jsonl": CountingJsonlReader, "parquet": CountingParquetReader}
    return [classes[s.kind](s.folder, glob_pattern=s.glob or None, files=s.files, text_key=text_key, id_key=id_key,
                            limit=limit, doc_progress=progress) for s in sources]


def check_inputs(paths: list[str]) -> list[str]:
    """Absolute input paths; a missing local one is a ConfigError naming it. Remote URLs pass through."""
    resolved = []
    for i, path in enumerate(paths):
        if "://" in path:
            resolved.append(path)
            continue
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise ConfigError(f"data_pipeline.input.paths[{i}]={path!r} does not exist (looked for {p})")
        if p.is_dir() and not any(f.is_file() for f in p.rglob("*")):
            raise ConfigError(f"data_pipeline.input.paths[{i}]={path!r} is an empty directory")
        resolved.append(str(p))
    return resolved
