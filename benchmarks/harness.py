"""What every benchmark shares: the job as ``python -m pretrain`` composes it, and one way to write results.

* :func:`job`: a ``JobConfig`` from Hydra overrides, composed from ``conf/config.yaml`` and checked exactly as
  ``python -m pretrain OVERRIDES`` does (unknown keys refused, ``validate_job``).
* :func:`emit` / :func:`write_json`: ``--json [PATH]`` (``-``: stdout, no table; ``*.jsonl``: one line appended;
  another path: written) and the human-readable table.
* :func:`append_results`: append to ``benchmarks/RESULTS.md`` (or another file), never rewriting it;
  :func:`markdown_table` / :func:`markdown_row`: the tables in it.
* :func:`command_line`: the command that reproduces a measurement, without the options that only say where
  its results went.

(Not ``benchmarks/common.py``: a benchmark run as a script has ``benchmarks/`` first on ``sys.path``, where a
``common.py`` would hide the project's ``common`` package.)
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def job(overrides: list[str], *, world_size: int = 1, model: dict | Callable[..., dict] | None = None):
    """The ``JobConfig`` that ``python -m pretrain OVERRIDES`` would run on ``world_size`` processes.

    ``model``: ``ModelConfig`` fields to replace after composing, before the job is validated; a function of the
    composed ``ModelConfig`` that returns them where they depend on the preset (a vocabulary for presets that
    take it from the data, a longer ``max_seq_len``).
    """
    from hydra import compose, initialize_config_module

    from common.cli import to_object
    from pretrain.config import register_configs, validate_job

    register_configs()
    with initialize_config_module(config_module="conf", version_base=None):
        cfg = compose("config", overrides=list(overrides))
    composed = to_object(cfg)
    changes = model(composed.model) if callable(model) else model
    if changes:
        composed.model = dataclasses.replace(composed.model, **changes)
    validate_job(composed, world_size)
    return composed


def write_json(doc: dict, dest: str | None) -> None:
    """``dest``: None nothing; ``-`` stdout; ``*.jsonl`` one line appended (the GPU script collects runs so);
    another path: the document, indented."""
    if dest is None:
        return
    if dest == "-":
        print(json.dumps(doc, indent=2, default=str))
    elif dest.endswith(".jsonl"):
        with open(dest, "a", encoding="utf-8") as f:
            f.write(json.dumps(doc, default=str) + "\n")
    else:
        Path(dest).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def emit(doc: dict, json_dest: str | None, table: Callable[[], object]) -> None:
    """Write ``doc`` to ``json_dest`` (:func:`write_json`); unless that is stdout, call ``table()``, which prints
    the human-readable form (or returns it as text, printed here)."""
    write_json(doc, json_dest)
    if json_dest != "-":
        text = table()
        if text is not None:
            print(text)


def command_line(script: str, argv: list[str], drop: dict[str, str]) -> str:
    """``python benchmarks/SCRIPT ARGV`` without the options in ``drop`` (name -> ``""`` a flag, ``"?"`` an
    optional value, ``"1"`` a value): where the results went is not part of the measurement."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        i += 1
        if name not in drop:
            kept.append(arg)
        elif "=" not in arg and i < len(argv) and (
                drop[name] == "1" or (drop[name] == "?" and not argv[i].startswith("--"))):
            i += 1  # its value
    return shlex.join(["python", f"benchmarks/{script}", *kept])


def append_results(text: str, path: Path = RESULTS_MD, *, section: str | None = None, opening: str = "") -> None:
    """Append ``text`` to ``path`` (created if missing; never rewritten; an exclusive lock keeps concurrent
    writers apart).

    ``section``: a ``## `` header line. When the file's last section is that one and its last line is a table
    row, ``text`` (a row) continues the table; otherwise ``opening`` (header, intro, table head) goes first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            old = f.read()
            prefix = ""
            if section is not None:
                headers = [line for line in old.splitlines() if line.startswith("## ")]
                continues = bool(headers) and headers[-1] == section and old.rstrip("\n").splitlines()[-1].startswith("|")
                if not continues:
                    prefix = ("\n" if old and not old.endswith("\n") else "") + opening
            f.seek(0, os.SEEK_END)
            f.write(prefix + text)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def markdown_table(columns: list[str], rows: list[list], *, align: str = "") -> list[str]:
    """A markdown table's lines: header, alignment (``align``: ``l`` or ``r`` per column; default all left), rows."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in (align or "l" * len(columns))) + "|"
    return [markdown_row(columns), rule, *map(markdown_row, rows)]


def markdown_row(cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def dist_version(name: str) -> str | None:
    """The installed version of distribution ``name``, None if it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def argv_of(argv: list[str] | None) -> list[str]:
    """The arguments a benchmark was called with (``main(argv)`` from a test, else the command line)."""
    return list(sys.argv[1:] if argv is None else argv)
