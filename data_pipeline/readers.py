"""Readers: datatrove's JSONL/Parquet readers, plus the accounting this pipeline needs.

datatrove's readers skip a line that is not JSON, or a record without text, with one warning and no count.
Here every input record is counted: ``total`` = ``forwarded`` + ``dropped``, with ``dropped_bad_json`` and
``dropped_missing_text`` as reasons (the same stat names datatrove's filters use), so the read stage
conserves counts like every other stage.
"""
from __future__ import annotations

from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints

from common.errors import ConfigError


class _CountingMixin:
    """Counts each record a reader parses, and why one yields no document."""

    def get_document_from_dict(self, data, source_file, id_in_file):
        self.stat_update(StatHints.total)
        if not isinstance(data, dict):
            self._drop("bad_json")
            return None
        text = data.get(self.text_key)
        if not isinstance(text, str) or not text:
            self._drop("missing_text")
            return None
        document = super().get_document_from_dict(data, source_file, id_in_file)
        self.stat_update(StatHints.forwarded)
        return document

    def _drop(self, reason: str) -> None:
        self.stat_update(StatHints.dropped, f"dropped_{reason}")


class CountingJsonlReader(_CountingMixin, JsonlReader):
    """JsonlReader that counts, rather than only logs, undecodable lines. Blank lines are not records."""

    def read_file(self, filepath: str):
        import orjson

        with self.data_folder.open(filepath, "r", compression=self.compression) as f:
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                with self.track_time():
                    try:
                        data = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        self.stat_update(StatHints.total)
                        self._drop("bad_json")
                        logger.warning(f"{filepath}:{line_no + 1}: not JSON ({exc}); skipped")
                        continue
                    document = self.get_document_from_dict(data, filepath, line_no)
                if document:
                    yield document


class CountingParquetReader(_CountingMixin, ParquetReader):
    """ParquetReader that counts rows without text."""


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


def _format_of(path: str, format: str) -> str:
    if format != "auto":
        return format
    return "parquet" if path.endswith((".parquet", ".pq")) else "jsonl"


def build_readers(paths: list[str], *, format: str, text_key: str, id_key: str, limit: int,
                  progress: bool) -> list:
    """One reader per input path: a file, or a directory (its ``*.jsonl*`` or ``*.parquet`` files, recursively).
    Readers chain in a pipeline: each reads its share of its own files in every task."""
    readers = []
    for path in paths:
        p = Path(path)
        folder, glob = (str(p.parent), p.name) if p.is_file() else (str(p), None)
        kind = _format_of(path, format)
        cls = CountingParquetReader if kind == "parquet" else CountingJsonlReader
        if glob is None:  # a directory: its files of that format, at any depth
            glob = "**/*.parquet" if kind == "parquet" else "**/*.jsonl*"
        readers.append(cls(folder, glob_pattern=glob, text_key=text_key, id_key=id_key, limit=limit,
                           doc_progress=progress))
    return readers


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
