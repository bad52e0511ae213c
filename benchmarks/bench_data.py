"""Data stage throughput (issue 6): Qwen2 tokenization, quality filters and MinHash dedup on one corpus.

    python benchmarks/bench_data.py                         # the shipped sample corpus, markdown table
    python benchmarks/bench_data.py --repeat 4 --runs 3     # tokenize the corpus 4x over; medians of 3 runs
    python benchmarks/bench_data.py --json                  # one JSON document on stdout
    python benchmarks/bench_data.py --record                # also append a section to benchmarks/RESULTS.md
    python benchmarks/bench_data.py --docs 40 --no-bpe-qwen --stage-backends tiktoken --runs 1 --json PATH  # smoke test

1. Tokenization with Qwen2's real vocabulary (``data_pipeline.qwen_vocab``, installed exactly as the pipeline
   installs it), every method on every core (``os.cpu_count()``), on the same texts: (a) this project's
   ``tokenize`` stage, built by ``build_stages`` and run by ``build_executors`` (datatrove
   ``LocalPipelineExecutor``, ``--workers`` tasks on as many processes; shards read back), once per
   ``--stage-backends`` engine (``data_pipeline.tokenizer.backend``: bpe_qwen, tiktoken, hf); (b) plain HF
   ``tokenizers`` ``encode_batch`` on the same tokenizer.json, in batches of 1000 (rayon threads, every core);
   (c) ``bpe-qwen`` 0.1.5 alone (``encode_batch_parallel``, one thread per core, no routing) on the
   vocab.json/merges.txt the stage writes; (d) tiktoken ``encode_ordinary`` with Qwen2's ranks and regex in
   one process per core (it holds the GIL), texts split into byte-balanced contiguous shares. The corpus is
   NFC already, so normalising (the tokenizer.json's NFC, bpe-qwen's NFC) changes no text and (d)'s lack of
   it changes no id. Token ids are compared document by document against (b) (+ the EOS the stage appends),
   and every mismatch is counted. (a) is given two ways: the stage's wall time (worker start and encoder
   load included) and its steady rate (tokens over the busiest task's time inside its steps: reading,
   encoding, writing; from datatrove's stats). "Fastest" is the highest median rate among (b), (c), (d);
   every ratio is to it. ``--repeat N`` tokenizes the corpus N times over so that the fixed costs weigh less.
2. Filters, one process (KB/s per core of document text read): datatrove's default chain (Gopher
   repetition, Gopher quality, C4, FineWeb; its defaults; spaCy's blank English word tokenizer) and this
   project's chain (``build_filters`` on the default config: the rules only for English or unknown
   language), each with datatrove's stock spaCy tokenizer and with the project's ``CachingSpacyTokenizer``,
   plus an experiment that replaces spaCy by regular expressions (not used by the pipeline). Kept documents
   (id and text: C4 rewrites the text) must be identical between stock and caching tokenizers; the run
   fails otherwise. ``--profile`` adds the top functions of one pass of the project chain.
3. MinHash (the project's 14 x 8, 5-gram, SHA-1 64-bit config), one process: the signature step alone and
   the 4 steps (signature, 14 bucket tasks, cluster, filter) in docs/s, with the stock and the caching word
   tokenizer; signatures must be byte-identical.

Filters and MinHash always run on the corpus once (``--docs`` first documents): repeated copies would be
exact duplicates for MinHash and would pre-warm the caching tokenizer. Times are medians over ``--runs``;
within a run the tokenizers and the filter chains take turns, so the machine's load hits them alike.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gzip
import io
import json
import os
import platform
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from benchmarks import harness
from data_pipeline.config import DEFAULT_CORPUS as CORPUS

MACHINE = "2-core CPU (Debian 12, Python 3.11)"


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--corpus", default=CORPUS, help="JSONL with id, text, metadata.language")
    p.add_argument("--docs", type=int, default=None, help="only the first N documents")
    p.add_argument("--repeat", type=int, default=1, help="tokenize the corpus N times over")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes (= tasks) for the project's tokenize stage; default: every core")
    p.add_argument("--stage-backends", default="bpe_qwen,tiktoken,hf",
                   help="data_pipeline.tokenizer.backend values to run the stage with, comma-separated")
    p.add_argument("--no-bpe-qwen", action="store_true", help="skip bpe-qwen (alone and as a stage backend)")
    p.add_argument("--skip", default="", help="sections to skip, comma-separated: tokenize,filters,minhash")
    p.add_argument("--profile", action="store_true", help="cProfile one pass of the project filter chain")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write results as JSON to PATH (or stdout with no PATH; then no table)")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--machine", default=MACHINE, help="machine description for --record")
    args = p.parse_args(argv)
    for name in ("repeat", "runs", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench_data {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def load_corpus(path: str, docs: int | None) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
            if docs is not None and len(records) >= docs:
                break
    if not records:
        raise SystemExit(f"no documents in {path}")
    return records


def documents(records: list[dict]) -> list:
    from datatrove.data import Document

    return [Document(text=r["text"], id=str(r["id"]), metadata=dict(r.get("metadata") or {})) for r in records]


def nbytes(texts) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


# ---------------------------------------------------------------------------------------------------------
# 1. tokenization


def _write_task_inputs(folder: Path, records: list[dict], tasks: int) -> None:
    """``<task>.jsonl.gz`` files as an earlier stage writes them: contiguous slices, balanced by bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [len(r["text"].encode("utf-8")) for r in records]
    total, bounds, acc, task = sum(sizes), [0], 0, 1
    for i, size in enumerate(sizes):
        acc += size
        if task < tasks and acc >= total * task / tasks:
            bounds.append(i + 1)
            task += 1
    bounds += [len(records)] * (tasks + 1 - len(bounds))
    for t in range(tasks):
        with gzip.open(folder / f"{t:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as f:
            for r in records[bounds[t]:bounds[t + 1]]:
                f.write(json.dumps({"text": r["text"], "id": r["id"], "metadata": r.get("metadata") or {}},
                                   ensure_ascii=False) + "\n")


def stage_runner(cfg_root: Path, tokenizer_json: Path, records: list[dict], workers: int, backend: str):
    """(a): the pipeline's own tokenize stage with ``backend``, one task per worker process. Returns run()."""
    from data_pipeline.config import DataPipelineConfig, ExecutorConfig, TokenizerConfig
    from data_pipeline.pipeline import Layout, build_executors, build_stages
    from common.shards import read_documents, shard_order
    from data_pipeline.readers import resolve_sources

    tasks, count = workers, [0]

    def run() -> dict:
        root = cfg_root / f"stage_{backend}_run{count[0]}"
        count[0] += 1
        cfg = DataPipelineConfig(tokenizer=TokenizerConfig(source="qwen2", backend=backend), progress=False,
                                 executor=ExecutorConfig(tasks=tasks, workers=workers), output_dir=str(root))
        layout = Layout(root)
        _write_task_inputs(layout.kept, records, tasks)
        shutil.copyfile(tokenizer_json, layout.tokenizer)
        sources = resolve_sources([CORPUS], cfg.input.format)
        stage = next(s for s in build_stages(cfg, layout, [CORPUS], sources) if s.name == "tokenize")
        (executor,) = build_executors(cfg, [stage], layout)
        t0 = time.perf_counter()
        executor.run()
        wall = time.perf_counter() - t0
        busiest, run_tokens, loads, engines = 0.0, 0, [], {}
        for task in range(tasks):
            steps = json.loads((layout.logs("tokenize") / "stats" / f"{task:05d}.json").read_text())
            busiest = max(busiest, sum(s["time_stats"]["total"] for s in steps))
            for s in steps:
                stats = {k: v["total"] if isinstance(v, dict) else v for k, v in s["stats"].items()}
                run_tokens += stats.get("tokens", 0)
                loads += [stats["encoder_load_s"]] if "encoder_load_s" in stats else []
                for key, v in stats.items():
                    if key.startswith("documents_"):
                        name = key.removeprefix("documents_")
                        engines[name] = engines.get(name, 0) + v
        # The stage shuffles each task's documents (as shipped): put them back in input order to compare ids.
        seed = cfg.tokenizer.shuffle_seed if cfg.tokenizer.shuffle_documents else None
        ids = []
        for task in range(tasks):
            if Path(f"{layout.shards}/{task:05d}_tokens.idx").exists():
                shard = [doc.tolist() for doc in read_documents(layout.shards / f"{task:05d}_tokens")]
                in_input_order = [None] * len(shard)
                for source, doc_ids in zip(shard_order(len(shard), seed, task), shard):  # shard[i] = input[order[i]]
                    in_input_order[source] = doc_ids
                ids += in_input_order
        assert run_tokens == sum(map(len, ids)), (run_tokens, sum(map(len, ids)))
        shutil.rmtree(root)
        return {"wall_s": wall, "steady_s": busiest, "ids": ids, "load_s": max(loads, default=0.0),
                "documents_per_engine": engines}

    return run


def hf_runner(tokenizer_json: Path, texts: list[str], batch: int = 1000):
    """(b): plain ``tokenizers`` encode_batch on the same tokenizer.json. Returns (load seconds, run())."""
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.encode_special_tokens = True  # as the shard writer: a literal control token is plain text
    load = time.perf_counter() - t0

    def run() -> dict:
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            out.extend(e.ids for e in tok.encode_batch(texts[i:i + batch]))
        return {"wall_s": time.perf_counter() - t0, "ids": out}

    return load, run


def bpe_qwen_runner(work: Path, texts: list[str], threads: int):
    """(c): bpe-qwen alone (no routing), from local files only, ``threads`` rayon threads. Returns (load seconds,
    version, run()), or a reason it is skipped."""
    from data_pipeline.encoders import BPE_QWEN_VERSION, available, write_bpe_qwen_files
    from data_pipeline.qwen_vocab import find_qwen_tiktoken

    if reason := available("bpe_qwen"):
        return reason
    import bpe_qwen

    folder = write_bpe_qwen_files(find_qwen_tiktoken(), work / "bpe_qwen")  # the files the stage uses
    t0 = time.perf_counter()
    tok = bpe_qwen.QwenTokenizer(str(folder))
    load = time.perf_counter() - t0

    def run() -> dict:
        t0 = time.perf_counter()
        out = tok.encode_batch_parallel(texts, threads)
        return {"wall_s": time.perf_counter() - t0, "ids": out}

    return load, BPE_QWEN_VERSION, run


_TIKTOKEN = None


def _tiktoken_init(path: str) -> None:
    global _TIKTOKEN
    from data_pipeline.encoders import TiktokenEncoder

    # The engine's own tiktoken Encoding (Qwen2's ranks and regex), used alone: no routing, no fallback.
    _TIKTOKEN = TiktokenEncoder(path, None, specials=[], parse_special_tokens=False).encoding


def _tiktoken_chunk(texts: list[str]) -> tuple[list[int], bytes]:
    """One worker's share: (per-text lengths, int32 ids), compact to send back."""
    from array import array

    lengths, ids = [], array("i")
    for text in texts:
        row = _TIKTOKEN.encode_ordinary(text)
        lengths.append(len(row))
        ids.extend(row)
    return lengths, ids.tobytes()


def _balanced_chunks(texts: list[str], n: int) -> list[list[str]]:
    total, chunks, acc, start = sum(map(len, texts)), [], 0, 0
    for i, t in enumerate(texts):
        acc += len(t)
        if len(chunks) < n - 1 and acc >= total * (len(chunks) + 1) / n:
            chunks.append(texts[start:i + 1])
            start = i + 1
    return chunks + [texts[start:]]


def tiktoken_runner(texts: list[str], procs: int):
    """(d): tiktoken ``encode_ordinary`` (Qwen2's ranks and regex) in ``procs`` processes (it holds the GIL, so
    threads would not use the cores), each given a contiguous, byte-balanced share. Returns (load s, run(), close)."""
    import multiprocessing as mp
    from array import array
    from concurrent.futures import ProcessPoolExecutor

    from data_pipeline.qwen_vocab import find_qwen_tiktoken

    path = find_qwen_tiktoken()
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"), initializer=_tiktoken_init, initargs=(path,))
    list(pool.map(_tiktoken_chunk, [[]] * procs))  # start every worker (and load the ranks) before timing
    load = time.perf_counter() - t0
    chunks = _balanced_chunks(texts, procs)

    def run() -> dict:
        t0 = time.perf_counter()
        parts = list(pool.map(_tiktoken_chunk, chunks))
        wall = time.perf_counter() - t0
        ids = []
        for lengths, raw in parts:
            flat, at = array("i", raw).tolist(), 0
            for n in lengths:
                ids.append(flat[at:at + n])
                at += n
        return {"wall_s": wall, "ids": ids}

    return load, run, pool.shutdown


def _mismatches(ref: list[list[int]], other: list[list[int]], texts: list[str], languages: list[str],
                append: int | None = None) -> dict:
    bad = []
    for i, (a, b) in enumerate(zip(ref, other)):
        a = list(a) + ([append] if append is not None else [])
        if a != list(b):
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            bad.append({"doc": i, "language": languages[i], "first_diff_token": first,
                        "text_near": texts[i][:80]})
    if len(ref) != len(other):
        bad.append({"doc": None, "language": None, "first_diff_token": None,
                    "text_near": f"document count {len(ref)} vs {len(other)}"})
    by_lang: dict[str, int] = {}
    for b in bad:
        by_lang[str(b["language"])] = by_lang.get(str(b["language"]), 0) + 1
    return {"compared_docs": min(len(ref), len(other)), "mismatched_docs": len(bad), "by_language": by_lang,
            "examples": bad[:5]}


def _tokenize_rows(results: dict, ids: dict, what: dict, loads: dict, *, workers: int, n_bytes: int) -> tuple[dict, str]:
    """Per method: tokens, median seconds (the stage: its steady time, and its wall time), rates, and the ratio to
    the fastest. Returns (rows, key of the fastest)."""
    rows = {}
    for key, res in results.items():
        walls = [r["wall_s"] for r in res]
        tokens = sum(map(len, ids[key]))
        if key.startswith("a_"):
            b = key.removeprefix("a_stage_")
            steady = [r["steady_s"] for r in res]
            rows[key] = {"what": f"this project's tokenize stage, backend={b} ({workers} workers, {workers} tasks)",
                         "tokens": tokens, "seconds": median(steady),
                         "seconds_all": steady, "wall_s": median(walls), "wall_s_all": walls,
                         "encoder_load_s": median([r["load_s"] for r in res]),
                         "documents_per_engine": res[0]["documents_per_engine"]}
        else:
            rows[key] = {"what": what[key], "tokens": tokens, "seconds": median(walls), "seconds_all": walls,
                         "load_s": loads[key]}
    for row in rows.values():
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["mb_per_s"] = n_bytes / row["seconds"] / 1e6
    # "fastest": the highest median rate among the tokenizers run alone on the in-memory texts (b, c, d)
    fastest_key = max((k for k in rows if not k.startswith("a_")), key=lambda k: rows[k]["tokens_per_s"])
    fastest = rows[fastest_key]["tokens_per_s"]
    for key, row in rows.items():
        row["ratio_to_fastest"] = row["tokens_per_s"] / fastest
        if key.startswith("a_"):
            row["tokens_per_s_wall"] = row["tokens"] / row["wall_s"]
            row["mb_per_s_wall"] = n_bytes / row["wall_s"] / 1e6
            row["ratio_to_fastest_wall"] = row["tokens_per_s_wall"] / fastest
    return rows, fastest_key


def bench_tokenize(args, records: list[dict], work: Path) -> dict:
    from data_pipeline.config import DataPipelineConfig, TokenizerConfig
    from data_pipeline.encoders import available
    from data_pipeline.pipeline import Layout, install_tokenizer

    log("tokenize: installing the Qwen2 tokenizer as the pipeline does (qwen.tiktoken -> tokenizer.json)")
    base = Layout(work / "tokenizer")
    base.root.mkdir(parents=True)
    t0 = time.perf_counter()
    install_tokenizer(DataPipelineConfig(tokenizer=TokenizerConfig(source="qwen2")), base)  # as the pipeline
    convert_s = time.perf_counter() - t0
    tokenizer_json = base.tokenizer
    rep = records * args.repeat
    texts = [r["text"] for r in rep]
    languages = [str((r.get("metadata") or {}).get("language")) for r in rep]
    n_bytes = nbytes(texts)
    eos = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    eos_id = next(t["id"] for t in eos["added_tokens"] if t["content"] == "<|endoftext|>")
    cores = os.cpu_count() or 1

    backends = [b.strip() for b in args.stage_backends.split(",") if b.strip()]
    skipped = {}
    for b in list(backends):
        reason = "--no-bpe-qwen" if b == "bpe_qwen" and args.no_bpe_qwen else available(b)
        if reason:
            skipped[f"stage {b}"] = reason
            backends.remove(b)
    log(f"tokenize: {len(texts)} docs, {n_bytes / 1e6:.2f} MB; stage backends {backends}; loading the tokenizers")
    runners, loads = {}, {}
    for b in backends:
        runners[f"a_stage_{b}"] = stage_runner(work, tokenizer_json, rep, args.workers, b)
    loads["b_hf_encode_batch"], runners["b_hf_encode_batch"] = hf_runner(tokenizer_json, texts)
    bq = "--no-bpe-qwen" if args.no_bpe_qwen else bpe_qwen_runner(work, texts, cores)
    if isinstance(bq, str):
        skipped["bpe-qwen alone"] = bq
    else:
        loads["c_bpe_qwen"], bq_version, runners["c_bpe_qwen"] = bq
    loads["d_tiktoken"], runners["d_tiktoken"], close_tiktoken = tiktoken_runner(texts, cores)
    results: dict[str, list[dict]] = {k: [] for k in runners}
    ids: dict[str, list] = {}
    try:
        for run in range(args.runs):  # interleaved, so that the load of the machine hits every method alike
            for key, fn in runners.items():
                r = fn()
                ids.setdefault(key, r.pop("ids"))
                results[key].append(r)
                log(f"tokenize run {run + 1}/{args.runs}: ({key}) {r['wall_s']:.2f}s"
                    + (f", steady {r['steady_s']:.2f}s, encoder load {r['load_s']:.1f}s" if "steady_s" in r else ""))
    finally:
        close_tiktoken()

    what = {"b_hf_encode_batch": f"HF tokenizers encode_batch (rayon, {cores} threads)",
            "d_tiktoken": f"tiktoken {harness.dist_version('tiktoken')} encode_ordinary ({cores} processes)"}
    if "c_bpe_qwen" in runners:
        what["c_bpe_qwen"] = f"bpe-qwen {bq_version} encode_batch_parallel alone ({cores} threads)"
    rows, fastest_key = _tokenize_rows(results, ids, what, loads, workers=args.workers, n_bytes=n_bytes)
    unique = len(records)  # repeated copies tokenize alike: compare the first copy
    ref = ids["b_hf_encode_batch"][:unique]
    checks = {}
    for key in rows:
        if key != "b_hf_encode_batch":
            checks[f"{key}_vs_b"] = _mismatches(ref, ids[key][:unique], texts, languages,
                                               append=eos_id if key.startswith("a_") else None)
    return {"corpus_docs": len(texts), "corpus_bytes": n_bytes, "repeat": args.repeat, "workers": args.workers,
            "cores": cores, "convert_qwen_tiktoken_s": convert_s, "eos_id": eos_id, "rows": rows,
            "fastest": fastest_key, "id_checks": checks, "skipped": skipped}


# ---------------------------------------------------------------------------------------------------------
# 2. filters


class RegexWordTokenizer:
    """Experiment only (not used by the pipeline): words = runs of word characters or of other non-space
    characters; sentences = datatrove's WhitespaceTokenizer regex. Changes decisions (reported)."""

    def __new__(cls):
        import regex
        from datatrove.utils.word_tokenizers import WhitespaceTokenizer

        class _Regex(WhitespaceTokenizer):
            _words = regex.compile(r"\w+|[^\w\s]+")

            def word_tokenize(self, text: str) -> list[str]:
                return self._words.findall(text)

        return _Regex()


def datatrove_default_chain(language) -> list:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return [GopherRepetitionFilter(language=language), GopherQualityFilter(language=language),
            C4QualityFilter(language=language), FineWebQualityFilter(language=language)]


def project_chain(tokenizer, work: Path) -> list:
    """``build_filters`` on the default config; ``tokenizer`` replaces what the rules get as ``language``
    (None: as shipped)."""
    from data_pipeline.config import FiltersConfig
    from data_pipeline.filters import build_filters

    steps = [step for _, step in build_filters(FiltersConfig(), work / "excluded")]
    for step in steps:
        step.exclusion_writer = None  # writing the dropped documents is not filtering
        if tokenizer is not None:
            step.rule.language = tokenizer
    return steps


def _preload(steps) -> None:
    """Load the spaCy pipeline before timing (a fixed cost); the caches stay cold."""
    for step in steps:
        lang = getattr(getattr(step, "rule", step), "language", None)
        if lang is not None and not isinstance(lang, str) and hasattr(lang, "tokenizer"):
            lang.tokenizer


def run_chain(steps, docs) -> list[tuple[str, str]]:
    data = iter(docs)
    for step in steps:
        data = step.run(data, 0, 1)
    return [(d.id, d.text) for d in data]


def bench_filters(args, records: list[dict], work: Path) -> dict:
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from data_pipeline.filters import CachingSpacyTokenizer, word_tokenizer

    n_bytes = nbytes(r["text"] for r in records)
    en_bytes = nbytes(r["text"] for r in records if (r.get("metadata") or {}).get("language") in ("en", None))
    load_word_tokenizer("eng").tokenizer  # datatrove's (process-wide) stock tokenizer, loaded once
    chains = {
        "datatrove_default_stock": ("datatrove default chain, stock spaCy tokenizer",
                                    lambda: datatrove_default_chain("eng")),
        "datatrove_default_caching": ("datatrove default chain, CachingSpacyTokenizer",
                                      lambda: datatrove_default_chain(word_tokenizer("eng"))),
        "project_stock": ("project chain, stock spaCy tokenizer (before)", lambda: project_chain("eng", work)),
        "project_shipped": ("project chain as shipped (CachingSpacyTokenizer)", lambda: project_chain(None, work)),
        "project_regex_experiment": ("project chain, regex words/sentences (experiment, not shipped)",
                                     lambda: project_chain(RegexWordTokenizer(), work)),
    }
    assert isinstance(project_chain(None, work)[0].rule.language, CachingSpacyTokenizer)
    rows, kept = {}, {}
    for run in range(args.runs):
        for key, (what, make) in chains.items():
            steps = make()
            _preload(steps)
            docs = documents(records)
            t0 = time.perf_counter()
            out = run_chain(steps, docs)
            elapsed = time.perf_counter() - t0
            rows.setdefault(key, {"what": what, "seconds_all": []})["seconds_all"].append(elapsed)
            kept.setdefault(key, out)
            log(f"filters run {run + 1}/{args.runs}: {key} {elapsed:.2f}s")
    for key, row in rows.items():
        row["seconds"] = median(row["seconds_all"])
        row["kb_per_s_per_core"] = n_bytes / row["seconds"] / 1e3
        row["kept_docs"] = len(kept[key])
    for key, ref in (("datatrove_default_caching", "datatrove_default_stock"),
                     ("project_shipped", "project_stock"), ("project_regex_experiment", "project_stock")):
        a, b = dict(kept[key]), dict(kept[ref])
        rows[key]["vs"] = ref
        rows[key]["identical_kept"] = kept[key] == kept[ref]
        rows[key]["decisions_differ"] = len(a.keys() ^ b.keys())
        rows[key]["texts_differ"] = sum(a[k] != b[k] for k in a.keys() & b.keys())
        rows[key]["speedup"] = rows[ref]["seconds"] / rows[key]["seconds"]
    result = {"docs": len(records), "bytes": n_bytes, "rules_bytes_project": en_bytes, "rows": rows,
              "kept_ids_project": sorted(k for k, _ in kept["project_shipped"])}
    if args.profile:
        result["profile"] = {key: profile_chain(chains[key][1], records)
                             for key in ("project_stock", "project_shipped")}
    return result


def profile_chain(make, records, top: int = 8) -> dict:
    steps = make()
    _preload(steps)
    docs = documents(records)
    prof = cProfile.Profile()
    prof.enable()
    run_chain(steps, docs)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = stats.total_tt
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append((tottime, cumtime, ncalls, f"{Path(file).name}:{line}({fn})"))
    by_tot = sorted(rows, reverse=True)[:top]

    def cum(name: str) -> float:
        return max((r[1] for r in rows if r[3].endswith(f"({name})")), default=0.0)

    return {"total_s": total,
            "share": {"spacy_new_lexeme (vocab lexeme creation)": cum("_new_lexeme") / total,
                      "spacy_tokenizer (incl. lexemes)": cum("_tokenize_affixes") / total,
                      "spacy_sentencizer": cum("predict") / total,
                      "gopher_repetition n-gram code": (cum("find_all_duplicate") + cum("find_top_duplicate")) / total},
            "top_tottime": [{"function": f, "tottime_s": t, "cumtime_s": c, "calls": n} for t, c, n, f in by_tot]}


# ---------------------------------------------------------------------------------------------------------
# 3. MinHash


def bench_minhash(args, records: list[dict], work: Path) -> dict:
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from loguru import logger

    from data_pipeline.config import MinhashConfig as ProjectMinhash
    from data_pipeline.filters import word_tokenizer
    from data_pipeline.pipeline import HASH

    logger.disable("datatrove")
    m = ProjectMinhash()
    mh = MinhashConfig(n_grams=m.n_grams, num_buckets=m.num_buckets, hashes_per_bucket=m.hashes_per_bucket,
                       seed=m.seed, hash_config=HASH)
    rows, sig_bytes, removed = {}, {}, {}
    try:
        for run in range(args.runs):
            for key, what, make in (("stock", "stock spaCy tokenizer (before)", lambda: "eng"),
                                    ("shipped", "CachingSpacyTokenizer (as shipped)", lambda: word_tokenizer("eng"))):
                root = work / f"minhash_{key}_{run}"
                sigs, buckets, remove = root / "sigs", root / "buckets", root / "remove"
                step = MinhashDedupSignature(str(sigs), config=mh, language=make())
                step.word_tokenizer.tokenizer  # load spaCy before timing; its caches stay cold
                docs = documents(records)
                t0 = time.perf_counter()
                step.run(iter(docs), 0, 1)
                t1 = time.perf_counter()
                for b in range(mh.num_buckets):
                    MinhashDedupBuckets(str(sigs), str(buckets), config=mh).run(None, b, mh.num_buckets)
                t2 = time.perf_counter()
                MinhashDedupCluster(str(buckets), str(remove), config=mh).run(None, 0, 1)
                t3 = time.perf_counter()
                kept = [d.id for d in MinhashDedupFilter(str(remove)).run(iter(docs), 0, 1)]
                t4 = time.perf_counter()
                row = rows.setdefault(key, {"what": what, "signature_s_all": [], "all4_s_all": [],
                                            "stage_s_all": {"signature": [], "buckets": [], "cluster": [],
                                                            "filter": []}})
                row["signature_s_all"].append(t1 - t0)
                row["all4_s_all"].append(t4 - t0)
                for name, s in zip(("signature", "buckets", "cluster", "filter"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    row["stage_s_all"][name].append(s)
                if run == 0:
                    sig_bytes[key] = {str(p.relative_to(sigs)): p.read_bytes()
                                      for p in sorted(sigs.rglob("*")) if p.is_file()}
                    removed[key] = sorted({d.id for d in docs} - set(kept))
                shutil.rmtree(root)
                log(f"minhash run {run + 1}/{args.runs}: {key} signature {t1 - t0:.2f}s, 4 steps {t4 - t0:.2f}s")
    finally:
        logger.enable("datatrove")
    n = len(records)
    for row in rows.values():
        row["signature_s"] = median(row["signature_s_all"])
        row["all4_s"] = median(row["all4_s_all"])
        row["stage_s"] = {k: median(v) for k, v in row.pop("stage_s_all").items()}
        row["signature_docs_per_s"] = n / row["signature_s"]
        row["all4_docs_per_s"] = n / row["all4_s"]
    rows["shipped"]["identical_signatures"] = sig_bytes["shipped"] == sig_bytes["stock"]
    rows["shipped"]["identical_removed"] = removed["shipped"] == removed["stock"]
    return {"docs": n, "rows": rows, "removed": len(removed["shipped"]), "removed_ids": removed["shipped"]}


# ---------------------------------------------------------------------------------------------------------
# report


def _f(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def table(doc: dict) -> str:
    runs = doc["config"]["runs"]
    out = []
    for key, section in (("tokenize", _tokenize_section), ("filters", _filters_section), ("minhash", _minhash_section)):
        if doc.get(key):
            out += section(doc[key], runs)
    return "\n".join(out)


def _tokenize_section(tok: dict, runs: int) -> list[str]:
    rows = []
    for key, r in tok["rows"].items():
        rows.append([f"({key[0]}) {r['what']}", f"{r['tokens']:,}", _f(r["seconds"]), _f(r["tokens_per_s"] / 1e6, 3),
                     _f(r["mb_per_s"]), _f(r["ratio_to_fastest"])])
        if key.startswith("a_"):
            rows.append(["(a) same, stage wall time (worker start + encoder load included)", f"{r['tokens']:,}",
                         _f(r["wall_s"]), _f(r["tokens_per_s_wall"] / 1e6, 3), _f(r["mb_per_s_wall"]),
                         _f(r["ratio_to_fastest_wall"])])
    rows += [[f"{what}: skipped, {reason}", "", "", "", "", ""] for what, reason in tok["skipped"].items()]
    out = [f"### Tokenization, Qwen2 vocabulary ({tok['corpus_docs']} docs, {tok['corpus_bytes'] / 1e6:.2f} MB = "
           f"corpus x {tok['repeat']}; {tok['cores']} cores; median of {runs})", "",
           *harness.markdown_table(["method", "tokens", "s", "Mtok/s", "MB/s", "x fastest"], rows, align="lrrrrr"), ""]
    out.append(f"Fastest = ({tok['fastest'][0]}), the highest median rate among the tokenizers run alone on the "
               "in-memory texts, (b) to (d), each on every core, tokenizer load excluded; the stage's rate is its "
               "busiest task's time inside its steps (reading the task's .jsonl.gz, encoding, writing the "
               ".bin/.idx), encoder load excluded.")
    loads = [f"qwen.tiktoken -> tokenizer.json {_f(tok['convert_qwen_tiktoken_s'], 1)} s"]
    loads += [f"({k[0]}) load {_f(r['load_s'], 1)} s" for k, r in tok["rows"].items() if "load_s" in r]
    loads += [f"stage backend={k.removeprefix('a_stage_')} encoder load per task {_f(r['encoder_load_s'], 1)} s"
              for k, r in tok["rows"].items() if k.startswith("a_")]
    out.append("Not timed above: " + ", ".join(loads) + ".")
    for key, r in tok["rows"].items():
        if key.startswith("a_"):
            out.append(f"Documents per engine, stage backend={key.removeprefix('a_stage_')} (run 1): "
                       + ", ".join(f"{e} {n:,}" for e, n in r["documents_per_engine"].items()))
    for key, c in tok["id_checks"].items():
        name = key.removesuffix("_vs_b")[2:]
        out.append(f"Token ids ({key[0]}) {name} vs (b): {c['mismatched_docs']} mismatched of {c['compared_docs']} "
                   "docs" + (f" {c['by_language']}" if c["mismatched_docs"] else ""))
    return out + [""]


def _filters_section(fil: dict, runs: int) -> list[str]:
    rows = []
    for r in fil["rows"].values():
        same = ("" if "vs" not in r else "yes" if r["identical_kept"] else
                f"NO ({r['decisions_differ']} decisions, {r['texts_differ']} texts differ)")
        rows.append([r["what"], _f(r["seconds"]), _f(r["kb_per_s_per_core"], 1), r["kept_docs"], r.get("vs", ""), same,
                     _f(r["speedup"]) + "x" if "speedup" in r else ""])
    out = [f"### Filters, one process ({fil['docs']} docs, {fil['bytes'] / 1e6:.2f} MB; the project's rules see "
           f"the {fil['rules_bytes_project'] / 1e6:.2f} MB in English; median of {runs})", "",
           *harness.markdown_table(["chain", "s", "KB/s/core", "kept", "vs", "same kept docs", "speed-up"], rows,
                                   align="lrrrllr"), ""]
    for key, p in fil.get("profile", {}).items():
        shares = ", ".join(f"{k} {v:.0%}" for k, v in p["share"].items())
        out.append(f"Profile {key} ({_f(p['total_s'], 1)} s under cProfile): {shares}. Top by own time: " +
                   "; ".join(f"{t['function']} {_f(t['tottime_s'])} s" for t in p["top_tottime"][:5]))
    return out + ([""] if fil.get("profile") else [])


def _minhash_section(mh: dict, runs: int) -> list[str]:
    rows = []
    for r in mh["rows"].values():
        same = "" if "identical_signatures" not in r else (
            "yes" if r["identical_signatures"] and r["identical_removed"] else "NO")
        rows.append([r["what"], _f(r["signature_s"]), _f(r["signature_docs_per_s"], 0), _f(r["all4_s"]),
                     _f(r["all4_docs_per_s"], 0), same])
    columns = ["word tokenizer", "signature s", "signature docs/s", "4 steps s", "4 steps docs/s", "identical"]
    return [f"### MinHash dedup, one process ({mh['docs']} docs; removed {mh['removed']}; median of {runs})", "",
            *harness.markdown_table(columns, rows, align="lrrrrl"), ""]


def record(doc: dict, text: str, args) -> None:
    """Append one section to benchmarks/RESULTS.md (never rewrites what is there)."""
    cmd = harness.command_line("bench_data.py", doc["argv"], {"--json": "?"})  # where the JSON went: not measured
    la0, la1 = ("/".join(f"{x:.1f}" for x in doc["machine"][k]) for k in ("load_average_before", "load_average_after"))
    section = (f"\n## Data stage: Qwen2 tokenization, quality filters, MinHash (bench_data.py)\n\n"
               f"Command: `{cmd}`\n"
               f"Machine: {args.machine}; {doc['machine']['versions']}.\n"
               f"Date: {doc['date']}; load average (1/5/15 min) {la0} before, {la1} after (a shared machine: "
               f"timings are noisy, compare rows of one run).\n\n{text.rstrip()}\n")
    if not harness.RESULTS_MD.exists():
        section = "# Benchmark results\n\nSections are appended, newest last.\n" + section
    harness.append_results(section)


def _versions() -> str:
    versions = {n: harness.dist_version(n) for n in ("datatrove", "tokenizers", "spacy", "bpe-qwen")}
    return ", ".join(f"{n} {v}" for n, v in versions.items() if v)


def main(argv=None) -> int:
    args = _parse(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"tokenize", "filters", "minhash"}
    if unknown:
        raise SystemExit(f"--skip: unknown section(s) {sorted(unknown)}")
    records = load_corpus(args.corpus, args.docs)
    load_before = os.getloadavg()
    doc = {"benchmark": "bench_data", "argv": harness.argv_of(argv),
           "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "config": {k: v for k, v in vars(args).items() if k not in ("json", "record")}}
    failures = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        if "tokenize" not in skip:
            doc["tokenize"] = bench_tokenize(args, records, work / "tok")
            for key, check in doc["tokenize"]["id_checks"].items():
                if key.startswith("a_") and check["mismatched_docs"]:
                    failures.append(f"token ids of the pipeline stage ({key}) differ from HF encode_batch")
        if "filters" not in skip:
            log("filters")
            doc["filters"] = bench_filters(args, records, work / "filters")
            rows = doc["filters"]["rows"]
            for key in ("project_shipped", "datatrove_default_caching"):
                if not rows[key]["identical_kept"]:
                    failures.append(f"filters: {key} kept other documents than {rows[key]['vs']}")
        if "minhash" not in skip:
            doc["minhash"] = bench_minhash(args, records, work / "minhash")
            r = doc["minhash"]["rows"]["shipped"]
            if not (r["identical_signatures"] and r["identical_removed"]):
                failures.append("minhash: the caching tokenizer changed signatures or removals")
    doc["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                      "load_average_before": load_before, "load_average_after": os.getloadavg(),
                      "versions": _versions()}
    doc["failures"] = failures
    text = table(doc)
    harness.emit(doc, args.json, lambda: "\n".join([text, *(f"FAILED: {f}" for f in failures)]))
    if args.record:
        record(doc, text, args)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
