"""Correctness gates of the GPU call (benchmarks/gpu/run.sh), checked before anything is timed.

    python benchmarks/gpu/gates.py fp32 $OUT/gate_fp32.json     # exit 0 pass, 1 fail, one line each
    python benchmarks/gpu/gates.py bf16 $OUT/gate_bf16.json

Both read a ``bench_throughput.py --json`` document (ours and the transformers peer, same initial weights,
same batch):

* fp32: step-0 losses within ``FP32_TOL`` = 1e-4 (absolute; ~1e-5 relative at the ~12 loss of a
  151,936-word vocabulary). Same function, same weights, fp32 on both sides: only summation order differs
  (on the CPU the two agree to ~1e-6).
* bf16: every step's losses within ``BF16_TOL`` = 2e-2 absolute, and both trajectories falling (last loss
  below the first; the batch repeats, so a working optimizer lowers it). bf16 has 8 mantissa bits: at a loss
  near 12 one unit in the last place is 0.06 for a bf16 scalar, and the two stacks round activations at
  different places; 2e-2 is what the bf16 CPU rehearsal leaves room for (it agrees to ~1e-3).
"""
from __future__ import annotations

import json
import sys

FP32_TOL = 1e-4
BF16_TOL = 2e-2


def _sides(doc: dict) -> tuple[dict, dict]:
    r = doc["results"]
    ours, peer = r.get("ours", {}), r.get("peer", {})
    for name, side in (("ours", ours), ("peer", peer)):
        if not side or "error" in side:
            raise ValueError(f"{name} did not run: {side.get('error', 'missing')}")
    return ours, peer


def check_fp32(doc: dict, tol: float = FP32_TOL) -> str:
    """'' if the gate passes, else why not."""
    try:
        ours, peer = _sides(doc)
    except ValueError as exc:
        return str(exc)
    if doc["config"]["precision"] != "fp32":
        return f"fp32 gate on a {doc['config']['precision']} run"
    diff = abs(ours["loss_step0"] - peer["loss_step0"])
    if not diff <= tol:  # NaN fails too
        return f"step-0 loss ours {ours['loss_step0']:.6f} vs transformers {peer['loss_step0']:.6f}: {diff:.2e} > {tol:g}"
    return ""


def check_bf16(doc: dict, tol: float = BF16_TOL) -> str:
    try:
        ours, peer = _sides(doc)
    except ValueError as exc:
        return str(exc)
    a, b = ours["losses"], peer["losses"]
    if len(a) != len(b) or len(a) < 2:
        return f"need >= 2 steps of both sides, got {len(a)} and {len(b)}"
    worst = max(abs(x - y) for x, y in zip(a, b))
    if not worst <= tol:
        return f"losses apart by {worst:.3g} > {tol:g}: ours {[round(x, 4) for x in a]} transformers {[round(x, 4) for x in b]}"
    for name, losses in (("ours", a), ("transformers", b)):
        if not losses[-1] < losses[0]:
            return f"{name}' loss did not fall: {[round(x, 4) for x in losses]}"
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("fp32", "bf16"):
        print("usage: gates.py fp32|bf16 RESULT.json", file=sys.stderr)
        return 2
    kind, path = argv
    try:
        doc = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        print(f"gate {kind}: FAIL (no result: {exc})")
        return 1
    why = (check_fp32 if kind == "fp32" else check_bf16)(doc)
    ours, peer = doc["results"].get("ours", {}), doc["results"].get("peer", {})
    detail = (f"step-0 loss ours {ours.get('loss_step0')} transformers {peer.get('loss_step0')}" if kind == "fp32"
              else f"losses ours {ours.get('losses')} transformers {peer.get('losses')}")
    print(f"gate {kind}: {'FAIL: ' + why if why else 'pass'} ({detail})")
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
