"""Bad input to the data stage: counted where the README says it is counted, else one clear line and exit 2.

In process: a line that is not UTF-8 is a counted drop (the rest of its task kept); a folder of Parquet files
(or of both formats) is found by format=auto. Through the CLI, as a user runs it: a wrong Parquet column, a
wrong JSONL field, a folder without input files and an output folder that cannot be created each end in one
`data error:`/`config error:` line naming the cause, exit status 2, and no manifest.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError, DataError
from data_pipeline import run_pipeline
from data_pipeline.config import DedupConfig, InputConfig, MinhashConfig
from data_pipeline.testing import RULE_FILTERS, no_rule_filters, prose, read_jsonl_gz, small_config, write_corpus

pytestmark = pytest.mark.timeout(180)

FAST = ["data_pipeline.tokenizer.vocab_size=400", "data_pipeline.dedup.minhash.enabled=false",
        "data_pipeline.progress=false", *(f"data_pipeline.filters.{name}.enabled=false" for name in RULE_FILTERS)]
BAD_UTF8 = b'{"id": "latin1", "text": "caf\xe9 cr\xe8me, written as Latin-1 bytes"}'


def fast_config(inputs, out, *, exact_dedup: bool = True, **input_kwargs):
    cfg = small_config(inputs, out, vocab_size=400, filters=no_rule_filters(),
                       dedup=DedupConfig(exact=exact_dedup, minhash=MinhashConfig(enabled=False)))
    cfg.input = InputConfig(paths=[str(p) for p in inputs], **input_kwargs)
    return cfg


def insert_lines(path: Path, at: dict[int, bytes], *, gz: bool = False) -> list[str]:
    """Put raw ``at[i]`` before line ``i`` (0-based) of ``path``; return the ids of the original records."""
    lines = path.read_bytes().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    for i in sorted(at, reverse=True):
        lines.insert(i, at[i])
    data = b"\n".join(lines) + b"\n"
    if gz:
        path.unlink()
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return ids


def test_non_utf8_lines_are_counted_and_the_rest_of_the_task_kept(tmp_path):
    a = write_corpus(tmp_path / "in" / "a.jsonl", good=12, exact_dups=0, seed=1)
    b = write_corpus(tmp_path / "in" / "b.jsonl", good=8, exact_dups=0, seed=2)
    # a: two bad lines mid-file (file lines 5 and 10); b (gzipped): one; the reader reads bytes in both
    ids = insert_lines(tmp_path / "in" / "a.jsonl", {4: BAD_UTF8, 8: b'{"id": "bad-2", "text": "\xff\xfe"}'})
    ids += insert_lines(tmp_path / "in" / "b.jsonl", {3: BAD_UTF8}, gz=True)
    assert len(ids) == a["records"] + b["records"] == 12 + 3 + 8 + 3

    # no dedup: both corpora hold the same planted 'short' and 'repetitive' documents
    summary = run_pipeline(fast_config([tmp_path / "in"], tmp_path / "out", exact_dedup=False))

    read = {s.stage: s for s in summary.stages}["read"]
    assert (read.read, read.kept, read.dropped) == (len(ids) + 3, len(ids), {"bad_encoding": 3})
    kept = read_jsonl_gz(tmp_path / "out" / "work" / "kept" / "00000.jsonl.gz")
    assert sorted(d["id"] for d in kept) == sorted(ids)  # every good record of both files, nothing else
    assert summary.manifest.documents == len(ids)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    for stage in stats["stages"]:
        assert stage["read"] == stage["kept"] + sum(stage["dropped"].values()), stage
    log = "".join(p.read_text() for p in (tmp_path / "out" / "logs" / "filter" / "logs").glob("*.log"))
    a_path, b_path = tmp_path / "in" / "a.jsonl", tmp_path / "in" / "b.jsonl.gz"
    assert f"{a_path}: 2 record(s) dropped as bad_encoding (first at line 5: not UTF-8" in log
    assert f"{b_path}: 1 record(s) dropped as bad_encoding (first at line 4: not UTF-8" in log


def test_auto_format_reads_a_folder_of_parquet_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(4)
    texts = [prose(rng) for _ in range(9)]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:4], "id": [f"p{i}" for i in range(4)]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"text": texts[4:7], "id": [f"q{i}" for i in range(3)]}),
                   tmp_path / "in" / "sub" / "b.parquet")
    summary = run_pipeline(fast_config([tmp_path / "in"], tmp_path / "out"))
    assert summary.manifest.documents == 7
    kept = read_jsonl_gz(tmp_path / "out" / "work" / "kept" / "00000.jsonl.gz")
    assert sorted(d["text"] for d in kept) == sorted(texts[:7])

    # both formats in one folder: one reader each, every record read
    (tmp_path / "in" / "c.jsonl").write_text("".join(json.dumps({"id": f"j{i}", "text": t}) + "\n"
                                                     for i, t in enumerate(texts[7:])))
    summary = run_pipeline(fast_config([tmp_path / "in"], tmp_path / "out2"))
    assert {s.stage: s for s in summary.stages}["read"].read == 9
    assert summary.manifest.documents == 9


def test_folder_without_input_files_says_what_was_looked_for(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an input\n")
    with pytest.raises(ConfigError, match=r"holds no jsonl or parquet files .*looked for \*\.jsonl\* and "
                                          r"\*\.parquet at any depth; it holds e\.g\. notes\.txt"):
        run_pipeline(fast_config([tmp_path / "in"], tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"holds no parquet files \(data_pipeline.input.format='parquet' looked "
                                          r"for \*\.parquet"):
        run_pipeline(fast_config([tmp_path / "in"], tmp_path / "out", format="parquet"))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_corrupt_parquet_file_is_named_before_any_work(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.parquet").write_bytes(b"PAR1 but not really a parquet file")
    with pytest.raises(DataError, match=f"^{tmp_path / 'in' / 'broken.parquet'} is not a readable Parquet file: "):
        run_pipeline(fast_config([tmp_path / "in"], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's /sys (read-only for every user, root too)")
def test_output_dir_that_cannot_be_written(tmp_path):
    write_corpus(tmp_path / "in.jsonl", good=3, exact_dups=0)
    with pytest.raises(ConfigError, match=r"^data_pipeline.output_dir='/sys/qwen-pretrain-probe/out' cannot be "
                                          r"written: .* \(/sys/qwen-pretrain-probe\)$"):
        run_pipeline(fast_config([tmp_path / "in.jsonl"], "/sys/qwen-pretrain-probe/out"))


# -- through the CLI: exit status 2, one line, no manifest ---------------------------------------------------

def cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "data_pipeline", *FAST, *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=170)


def error_line(proc: subprocess.CompletedProcess, kind: str) -> str:
    """The one error line of a refused run (its last stderr line); no traceback anywhere."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if " error: " in f" {line}"] == [lines[-1]], lines[-5:]
    assert lines[-1].startswith(f"{kind} error: ")
    return lines[-1]


def test_cli_wrong_parquet_column_names_the_column_before_any_work(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [prose(random.Random(i)) for i in range(3)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": texts, "id": ["a", "b", "c"]}), tmp_path / "in" / "docs.parquet")
    out = tmp_path / "out"
    proc = cli(tmp_path, f"data_pipeline.input.paths=[{tmp_path / 'in'}]", "data_pipeline.input.text_key=body",
               f"data_pipeline.output_dir={out}")
    line = error_line(proc, "data")
    assert line == (f"data error: the reader found no text column 'body' (data_pipeline.input.text_key) in "
                    f"{tmp_path / 'in' / 'docs.parquet'}: its columns are text, id")
    assert proc.stderr.strip() == line  # checked before any stage ran
    assert sorted(p.name for p in out.iterdir()) == ["hydra"]  # only Hydra's record of the run


def test_cli_wrong_jsonl_field_blames_the_reader_not_the_filters(tmp_path):
    info = write_corpus(tmp_path / "in.jsonl", good=5, exact_dups=0)
    out = tmp_path / "out"
    proc = cli(tmp_path, f"data_pipeline.input.paths=[{tmp_path / 'in.jsonl'}]", "data_pipeline.input.text_key=body",
               f"data_pipeline.output_dir={out}")
    line = error_line(proc, "data")
    assert line.startswith(f"data error: the reader found no text in field 'body' (data_pipeline.input.text_key) "
                           f"in any of the {info['records']} records of {tmp_path / 'in.jsonl'} "
                           f"(missing_text={info['records']}); the first record's fields: id, text")
    assert "filters" not in line
    assert not (out / "manifest.json").exists() and not (out / "logs" / "tokenize").exists()  # stopped after reading


def test_cli_folder_without_input_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.json").write_text('{"text": "x"}\n')
    proc = cli(tmp_path, f"data_pipeline.input.paths=[{tmp_path / 'in'}]", f"data_pipeline.output_dir={tmp_path / 'out'}")
    line = error_line(proc, "config")
    assert f"data_pipeline.input.paths[0]='{tmp_path / 'in'}' holds no jsonl or parquet files" in line
    assert "*.jsonl* and *.parquet" in line and "a.json" in line


def test_cli_output_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("")
    write_corpus(tmp_path / "in.jsonl", good=3, exact_dups=0)
    proc = cli(tmp_path, f"data_pipeline.input.paths=[{tmp_path / 'in.jsonl'}]",
               f"data_pipeline.output_dir={tmp_path / 'a_file' / 'out'}")
    line = error_line(proc, "config")
    assert line == (f"config error: data_pipeline.output_dir='{tmp_path / 'a_file' / 'out'}' cannot be created: "
                    f"{tmp_path / 'a_file'} is a file, not a directory")
    assert proc.stderr.strip() == line and sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in.jsonl"]
