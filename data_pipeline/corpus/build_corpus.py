#!/usr/bin/env python3
"""Rebuild the embedded default corpus ``data_pipeline/corpus/sample.jsonl``.

The corpus is real, human-written prose: "The Debian Administrator's Handbook"
(Raphaël Hertzog, Roland Mas and its translation teams), dual-licensed
GPL-2.0-or-later OR CC-BY-SA-3.0, as shipped by the Debian package
``debian-handbook`` version ``11.20220922`` (Debian 12 "bookworm", main).
See PROVENANCE.md next to this file for the full story.

Install the source first (no system-wide install needed)::

    apt-get update
    cd /tmp && apt-get download debian-handbook=11.20220922
    dpkg -x debian-handbook_11.20220922_all.deb /tmp/corpus-src

then run (standard library only, Python >= 3.9)::

    python data_pipeline/corpus/build_corpus.py --root /tmp/corpus-src

(``--root /`` works too if the package is installed with ``apt-get install
debian-handbook``.)  The output is fully deterministic (fixed seed, sorted file
lists), so re-running it against the same package version reproduces
``sample.jsonl``, ``planted_duplicates.json`` and ``planted_low_quality.json``
byte for byte.

What it does:

1. Parses the publican-generated XHTML of a few language editions with the
   standard-library ``html.parser``: keeps paragraphs (``div.para``), list
   items, definition terms and section titles; drops code/screen listings
   (``pre``), tables, figures, index anchors, tables of contents, navigation.
2. Cuts each HTML page (one book section) into documents at paragraph
   boundaries: a new document starts at a section title once the current one
   has >= SOFT_MIN chars, or when adding the next paragraph would exceed
   MAX_CHARS.  Documents outside [MIN_CHARS, 5000] characters are dropped.
3. For non-English editions, drops paragraphs left untranslated (identical to
   an English paragraph, sharing > 40% of their word 3-grams with the English
   edition, or, for ja/zh/ru, with < 30% native-script letters), so no
   accidental cross-language duplicates sneak in.
4. Keeps all English documents and a deterministic, chapter-spread sample of
   the other languages (whole pages in seeded order until a per-language
   UTF-8 byte budget is reached, then back in book order).
5. Plants, deterministically, exact duplicates (verbatim copies under a new
   id), near duplicates (a real document with one sentence dropped, two word
   pairs swapped and one short word doubled; word 5-gram Jaccard with its
   source verified >= 0.8) and
   low-quality documents (real garbage taken from the same pages: table of
   contents fragments, navigation bars, lone headings, ``pre`` separator
   lines, raw listings, repeated lines).
6. Inserts the planted documents at seeded random positions among the
   originals (which keep book order), numbers the ids in file order and
   writes the three output files.
"""
from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

SEED = 20240601
PACKAGE = "debian-handbook"
PACKAGE_VERSION = "11.20220922"
LICENSE = "GPL-2.0-or-later OR CC-BY-SA-3.0"
SOURCE = "debian-handbook"
HTML_DIR = "usr/share/doc/debian-handbook/html"

# language code -> (publican directory, UTF-8 byte budget; None = everything)
LANGUAGES = {
    "en": ("en-US", None),
    "de": ("de-DE", 110_000),
    "fr": ("fr-FR", 110_000),
    "es": ("es-ES", 100_000),
    "ru": ("ru-RU", 90_000),
    "ja": ("ja-JP", 90_000),
    "zh": ("zh-CN", 90_000),
}

MIN_CHARS = 200
SOFT_MIN = 700
MAX_CHARS = 2500
HARD_MAX = 5000
EXACT_FRACTION = 0.04
NEAR_FRACTION = 0.04
NEAR_MIN_JACCARD = 0.8

OUT_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------
# HTML -> blocks


class _HandbookParser(html.parser.HTMLParser):
    """Collect (kind, text) blocks from one publican XHTML page.

    kind is "title" for section headings and "para" for prose.  Also keeps the
    raw text of garbage-ish regions (toc, docnav, pre) for the low-quality
    samples.
    """

    SKIP_CLASSES = {
        "toc", "docnav", "navheader", "navfooter", "indexterm", "table",
        "informaltable", "figure", "mediaobject", "legalnotice", "footnotes",
        "example", "informalexample", "calloutlist",
    }
    BLOCK_TAGS = {"h1", "h2", "h3", "h4", "h5", "dt"}
    CAPTURE_CLASSES = {"toc", "docnav"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []
        self.pre_texts: list[str] = []
        self.captured: dict[str, list[str]] = {"toc": [], "docnav": []}
        self._stack: list[tuple[str, str]] = []  # (tag, role)
        self._skip = 0
        self._pre = 0
        self._buf: list[str] = []
        self._kind: list[str] = []
        self._pre_buf: list[str] = []
        self._cap: list[tuple[str, list[str]]] = []

    # helpers
    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
        self._buf = []
        if text and self._kind:
            self.blocks.append((self._kind[-1], text))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        role = "other"
        if self._cap and tag in ("dt", "li"):
            for _, parts in self._cap:
                parts.append("\n")
        if classes & self.CAPTURE_CLASSES:
            name = sorted(classes & self.CAPTURE_CLASSES)[0]
            self._cap.append((name, []))
            role = "capture:" + name
        if tag == "pre":
            role = "pre"
            self._pre += 1
            self._pre_buf = []
        elif classes & self.SKIP_CLASSES or tag in {"script", "style", "title", "head"}:
            if role == "other":
                role = "skip"
            else:
                role = role + "+skip"
            self._skip += 1
        elif self._skip == 0 and self._pre == 0 and (
            (tag == "div" and "para" in classes)
            or tag in self.BLOCK_TAGS
            or (tag == "p" and "title" not in classes)
            or (tag == "li" and "listitem" in classes)
        ):
            self._flush()
            role = "block"
            self._kind.append("title" if tag in {"h1", "h2", "h3", "h4", "h5"} else "para")
        elif tag == "br":
            self.handle_data(" ")
        self._stack.append((tag, role))

    def handle_startendtag(self, tag, attrs):
        if tag == "br":
            self.handle_data(" ")

    def handle_endtag(self, tag):
        if self._cap and tag == "strong":
            for _, parts in self._cap:
                parts.append(" ")
        # pop up to the matching tag (XHTML is well formed, this is defensive)
        while self._stack:
            t, role = self._stack.pop()
            if role.startswith("capture:"):
                name, parts = self._cap.pop()
                text = re.sub(r"[ \t]+", " ", "".join(parts)).strip()
                if text:
                    self.captured[name.split("+")[0]].append(text)
                if role.endswith("+skip"):
                    self._skip -= 1
            elif role == "skip":
                self._skip -= 1
            elif role == "pre":
                self._pre -= 1
                self.pre_texts.append("".join(self._pre_buf))
            elif role == "block":
                self._flush()
                self._kind.pop()
            if t == tag:
                break

    def handle_data(self, data):
        for _, parts in self._cap:
            parts.append(data if data.strip() else " ")
        if self._pre:
            self._pre_buf.append(data)
            return
        if self._skip or not self._kind:
            return
        self._buf.append(data)


def parse_page(path: Path) -> _HandbookParser:
    p = _HandbookParser()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


# --------------------------------------------------------------------------
# blocks -> documents

_NATIVE = {
    "ru": re.compile(r"[\u0400-\u04ff]"),
    "ja": re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]"),
    "zh": re.compile(r"[\u4e00-\u9fff]"),
}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()


def _word_ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", _norm(text))
    return {tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1))}


def _keep_para(lang: str, text: str, english: set[str], english_3grams: set) -> bool:
    if lang == "en":
        return True
    if _norm(text) in english:
        return False  # left untranslated
    grams = _word_ngrams(text)
    if grams and len(grams & english_3grams) / len(grams) > 0.4:
        return False  # untranslated, up to quote marks / translated cross-references
    if lang in _NATIVE:
        letters = sum(ch.isalpha() for ch in text) or 1
        return len(_NATIVE[lang].findall(text)) / letters >= 0.3
    return True


def page_documents(blocks: list[tuple[str, str]]) -> list[str]:
    docs: list[str] = []
    cur: list[str] = []
    size = 0

    def close():
        nonlocal cur, size
        # drop trailing headings: a document should not end on a title
        while cur and cur[-1].startswith("\0"):
            cur.pop()
        text = "\n\n".join(c.lstrip("\0") for c in cur)
        has_prose = any(not c.startswith("\0") for c in cur)
        if has_prose and MIN_CHARS <= len(text) <= HARD_MAX:
            docs.append(text)
        cur, size = [], 0

    for kind, text in blocks:
        if len(text) > HARD_MAX:
            continue
        item = ("\0" + text) if kind == "title" else text
        if cur and (
            (kind == "title" and size >= SOFT_MIN) or size + len(text) + 2 > MAX_CHARS
        ):
            close()
        cur.append(item)
        size += len(text) + 2
    if cur:
        close()
    return docs


def pages(root: Path, pubdir: str) -> list[Path]:
    d = root / HTML_DIR / pubdir
    files = sorted(p for p in d.glob("*.html") if p.name != "index.html")
    if not files:
        sys.exit(f"no HTML found under {d}: install/extract {PACKAGE}={PACKAGE_VERSION} first")
    return files


# --------------------------------------------------------------------------
# planted duplicates / garbage


def word_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = word_shingles(a), word_shingles(b)
    if not sa or not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-ZÀ-ÖØ-ÞА-Я«“\"(])")


def near_duplicate(text: str, rng: random.Random) -> str:
    """Small, editor-like changes: drop one sentence, swap a few word pairs,
    tweak one word.  Keeps paragraph structure."""
    paras = text.split("\n\n")
    # 1. drop one middle-ish sentence of a multi-sentence paragraph
    cands = [i for i, p in enumerate(paras) if len(_SENT.split(p)) >= 3]
    if cands:
        i = rng.choice(cands)
        sents = _SENT.split(paras[i])
        del sents[rng.randrange(1, len(sents))]
        paras[i] = " ".join(sents)
    out = "\n\n".join(paras)
    # 2. swap two adjacent words in two places
    words = out.split(" ")
    for _ in range(2):
        idx = [k for k in range(len(words) - 1)
               if words[k].isalpha() and words[k + 1].isalpha() and "\n" not in words[k] + words[k + 1]]
        if idx:
            k = rng.choice(idx)
            words[k], words[k + 1] = words[k + 1], words[k]
    # 3. duplicate one short word (a typical typo, "the the")
    idx = [k for k, w in enumerate(words) if w.isalpha() and len(w) <= 4]
    if idx:
        k = rng.choice(idx)
        words.insert(k, words[k])
    return " ".join(words)


def garbage_docs(parsed: dict[str, list[_HandbookParser]], rng: random.Random) -> list[tuple[str, str, str]]:
    """Return (lang, kind, text) low-quality documents cut from the sources."""
    out: list[tuple[str, str, str]] = []
    en = parsed["en"]
    # (a) table-of-contents fragments (chapter pages carry a div.toc)
    tocs = sorted({t for p in en for t in p.captured["toc"] if len(t) > 200})
    for t in rng.sample(tocs, 4):
        lines = [ln.strip() for ln in t.splitlines() if ln.strip()]
        out.append(("en", "toc-fragment", "\n".join(lines[:12])))
    for lang in ("de", "ja"):
        tocs = sorted({t for p in parsed[lang] for t in p.captured["toc"] if len(t) > 200})
        t = rng.choice(tocs)
        lines = [ln.strip() for ln in t.splitlines() if ln.strip()]
        out.append((lang, "toc-fragment", "\n".join(lines[:10])))
    # (b) navigation bars (ul.docnav): "Prev ... Up Home Next ..."
    navs = sorted({re.sub(r"\s+", " ", t) for p in en for t in p.captured["docnav"]})
    for t in rng.sample(navs, 3):
        out.append(("en", "navigation", t))
    # (c) lone section headings / very short fragments
    titles = sorted({t for p in en for k, t in p.blocks if k == "title" and len(t) < 60})
    for t in rng.sample(titles, 4):
        out.append(("en", "short-fragment", t))
    titles_fr = sorted({t for p in parsed["fr"] for k, t in p.blocks if k == "title" and len(t) < 60})
    out.append(("fr", "short-fragment", rng.choice(titles_fr)))
    # (d) symbol / separator lines from screen listings
    def _symbolic(ln: str) -> bool:
        core = ln.strip()
        if len(core) < 20:
            return False
        return sum(not c.isalnum() and not c.isspace() for c in core) / len(core) > 0.6

    sym_lines = sorted({ln.rstrip() for p in en for pre in p.pre_texts
                        for ln in pre.splitlines() if _symbolic(ln)})
    if sym_lines:
        starts = rng.sample(range(0, len(sym_lines), 3), min(3, len(range(0, len(sym_lines), 3))))
        for k in sorted(starts):
            chunk = sym_lines[k:k + 6]
            out.append(("en", "symbols", "\n".join(chunk * 4)))
    # (e) raw listing dumps: a screen/program listing with no prose at all
    pres = sorted({pre.strip() for p in en for pre in p.pre_texts if 300 <= len(pre.strip()) <= 1500})
    for t in rng.sample(pres, 3):
        out.append(("en", "listing", t))
    # (f) repetitive documents: one real line repeated many times
    nav = rng.choice(navs)
    out.append(("en", "repetitive", "\n".join([nav] * 40)))
    title = rng.choice(titles)
    out.append(("en", "repetitive", " ".join([title] * 60)))
    shorts = sorted({t for p in en for k, t in p.blocks if k == "para" and 40 <= len(t) <= 120})
    out.append(("en", "repetitive", "\n".join([rng.choice(shorts)] * 30)))
    return out


# --------------------------------------------------------------------------


def build(root: Path) -> tuple[list[dict], list[dict], list[dict], dict]:
    rng = random.Random(SEED)
    parsed: dict[str, list[_HandbookParser]] = {}
    for lang, (pubdir, _) in LANGUAGES.items():
        parsed[lang] = [parse_page(p) for p in pages(root, pubdir)]

    english = {_norm(t) for p in parsed["en"] for _, t in p.blocks}
    english_3grams = {g for t in english for g in _word_ngrams(t)}
    by_lang: dict[str, list[str]] = {}
    for lang, (pubdir, budget) in LANGUAGES.items():
        page_docs = []
        for p in parsed[lang]:
            blocks = [(k, t) for k, t in p.blocks if k == "title" or _keep_para(lang, t, english, english_3grams)]
            page_docs.append(page_documents(blocks))
        if budget is None:
            docs = [d for pd in page_docs for d in pd]
        else:
            # spread the sample over the whole book: take pages in a seeded
            # order, whole pages at a time, until the budget is met; then
            # restore book order
            order = list(range(len(page_docs)))
            random.Random(f"{SEED}-{lang}").shuffle(order)
            chosen, total = [], 0
            for i in order:
                if total >= budget:
                    break
                if not page_docs[i]:
                    continue
                chosen.append(i)
                total += sum(len(d.encode("utf-8")) for d in page_docs[i])
            docs = [d for i in sorted(chosen) for d in page_docs[i]]
        by_lang[lang] = docs

    # de-duplicate the base documents exactly (the book has no repeats, but be sure)
    seen: set[str] = set()
    base: list[dict] = []
    for lang in LANGUAGES:
        for text in by_lang[lang]:
            h = hashlib.sha1(_norm(text).encode()).hexdigest()
            if h in seen:
                continue
            seen.add(h)
            base.append({"text": text, "lang": lang, "kind": "original", "source": None})

    n_base = len(base)
    n_exact = round(n_base * EXACT_FRACTION)
    n_near = round(n_base * NEAR_FRACTION)

    picks = rng.sample(range(n_base), n_exact)
    planted = [{"text": base[i]["text"], "lang": base[i]["lang"], "kind": "exact", "source": i}
               for i in picks]

    spaced = [i for i, d in enumerate(base)
              if d["lang"] in ("en", "de", "fr", "es", "ru") and len(d["text"].split()) >= 120
              and i not in set(picks)]
    rng.shuffle(spaced)
    near_j: list[float] = []
    for i in spaced:
        if len(near_j) >= n_near:
            break
        text = near_duplicate(base[i]["text"], rng)
        j = jaccard(text, base[i]["text"])
        if text != base[i]["text"] and NEAR_MIN_JACCARD <= j < 1.0:
            planted.append({"text": text, "lang": base[i]["lang"], "kind": "near", "source": i})
            near_j.append(j)

    garbage = [{"text": t, "lang": lang, "kind": "garbage:" + kind, "source": None}
               for lang, kind, t in garbage_docs(parsed, rng)]

    # interleave: originals keep their relative order, the extras are dropped
    # at seeded random positions
    extras = planted + garbage
    positions = sorted(rng.randrange(n_base + 1) for _ in extras)
    rng.shuffle(extras)
    final: list[dict] = []
    base_idx_to_final: dict[int, int] = {}
    e = 0
    for i in range(n_base + 1):
        while e < len(extras) and positions[e] == i:
            final.append(extras[e])
            e += 1
        if i < n_base:
            base_idx_to_final[i] = len(final)
            final.append(base[i])

    width = len(str(len(final)))
    rows, dup_records, garbage_records = [], [], []
    for n, d in enumerate(final):
        doc_id = f"{SOURCE}-{n:0{width}d}"
        d["id"] = doc_id
    for d in final:
        rows.append({
            "id": d["id"],
            "text": d["text"],
            "metadata": {"source": SOURCE, "language": d["lang"], "license": LICENSE},
        })
        if d["kind"] in ("exact", "near"):
            dup_records.append({"id": d["id"], "kind": d["kind"],
                                "source_id": final[base_idx_to_final[d["source"]]]["id"]})
        elif d["kind"].startswith("garbage:"):
            garbage_records.append({"id": d["id"], "kind": d["kind"].split(":", 1)[1],
                                    "language": d["lang"]})
    stats = {"near_jaccard_min": min(near_j) if near_j else None,
             "near_jaccard_mean": sum(near_j) / len(near_j) if near_j else None}
    return rows, dup_records, garbage_records, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/corpus-src"),
                    help="directory the debian-handbook .deb was extracted into (or /)")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)

    rows, dups, garbage, stats = build(args.root)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "sample.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(args.out_dir / "planted_duplicates.json", "w", encoding="utf-8") as f:
        json.dump(dups, f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(args.out_dir / "planted_low_quality.json", "w", encoding="utf-8") as f:
        json.dump(garbage, f, ensure_ascii=False, indent=1)
        f.write("\n")

    langs: dict[str, list[int]] = {}
    for r in rows:
        c = langs.setdefault(r["metadata"]["language"], [0, 0])
        c[0] += 1
        c[1] += len(r["text"].encode("utf-8"))
    print(f"{len(rows)} documents, {sum(c[1] for c in langs.values())} text bytes")
    for lang, (n, b) in sorted(langs.items(), key=lambda kv: -kv[1][1]):
        print(f"  {lang}: {n} docs, {b} bytes")
    print(f"planted: {sum(d['kind'] == 'exact' for d in dups)} exact, "
          f"{sum(d['kind'] == 'near' for d in dups)} near "
          f"(5-gram Jaccard min {stats['near_jaccard_min']:.3f}, mean {stats['near_jaccard_mean']:.3f}), "
          f"{len(garbage)} low-quality")
    return 0


if __name__ == "__main__":
    sys.exit(main())
