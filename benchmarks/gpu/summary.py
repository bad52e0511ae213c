"""One line per benchmark of a ``results.jsonl`` (benchmarks/gpu/run.sh's summary, the call's output tail)."""
from __future__ import annotations

import json
import sys


def knobs(doc: dict) -> str:
    c = doc["config"]
    parts = list(c.get("overrides") or [])
    if c.get("peer") == "none":
        parts.append("ours only")
    return " ".join(parts) or "(defaults)"


def rows(lines: list[str]) -> list[str]:
    out = [f"{'model':18s} {'layers':>6s} {'side':5s} {'tok/s':>9s} {'MFU':>6s} {'causal':>6s} {'of mm':>6s} "
           f"{'GiB':>6s} {'loss0':>8s} {'attn':>9s}  knobs"]
    for doc in map(json.loads, lines):
        c = doc["config"]
        for name, s in doc["results"].items():
            if "error" in s:
                out.append(f"{c['model']:18s} {c['layers']:6d} {name:5s} {s['error'][:60]}  {knobs(doc)}")
                continue

            def pct(key):
                return f"{s[key]:.1%}" if s.get(key) is not None else "n/a"

            mem = f"{s['peak_memory_gib']:.1f}" if s.get("peak_memory_gib") is not None else "n/a"
            out.append(f"{c['model']:18s} {c['layers']:6d} {name:5s} {s['tokens_per_s']:9.0f} {pct('mfu'):>6s} "
                       f"{pct('mfu_causal'):>6s} {pct('matmul_fraction'):>6s} {mem:>6s} {s['loss_step0']:8.4f} "
                       f"{str(s.get('sdpa_backend_used') or '-')[:9]:>9s}  {knobs(doc)}")
        if "ratio_tokens_per_s_ours_over_peer" in doc:
            out.append(f"{'':18s} {'':6s} ratio ours/peer {doc['ratio_tokens_per_s_ours_over_peer']:.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    path = (sys.argv[1:] if argv is None else argv)[0]
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        print(f"summary: no results ({path})")
        return 0
    print("\n".join(rows(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
