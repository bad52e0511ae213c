"""Print a plan: a ranked table, or one JSON object per layout."""
from __future__ import annotations

import json

from pretrain.plan.search import Estimate

_MEM = ("weights", "gradients", "optimizer_state", "activations", "logits_loss", "comm_buffers", "total")
_TIME = ("compute", "tp_comm", "cp_comm", "ep_comm", "pp_bubble", "dp_comm", "total")


def _row(rank: int, e: Estimate) -> str:
    lay = e.layout
    cells = [str(rank), str(lay.tp), "y" if lay.sequence_parallel else "n", str(lay.pp), str(lay.vpp), str(lay.cp),
             str(lay.ep), str(lay.dp), str(lay.zero), lay.recompute, str(lay.micro_batch_size)]
    if e.memory:
        cells += [f"{e.memory[k]:.1f}" for k in _MEM]
        cells += [f"{e.time[k]:.2f}" for k in _TIME] + [f"{e.tokens_per_s_per_gpu:,.0f}", f"{100 * e.mfu:.1f}%"]
    else:
        cells += ["-"] * (len(_MEM) + len(_TIME) + 2)
    cells.append(e.reason or "fits")
    return "| " + " | ".join(cells) + " |"


def render_table(estimates: list[Estimate], *, top: int, show_infeasible: int, title: str) -> str:
    feasible = [e for e in estimates if e.feasible][:top]
    infeasible = [e for e in estimates if not e.feasible and e.memory][:show_infeasible]
    invalid = [e for e in estimates if not e.feasible and not e.memory][: max(0, show_infeasible - len(infeasible))]
    head = (["#", "tp", "sp", "pp", "vpp", "cp", "ep", "dp", "zero", "recompute", "mbs"]
            + [f"{k} GiB" for k in _MEM] + [f"{k} s" for k in _TIME] + ["tok/s/GPU", "MFU", "note"])
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_row(i + 1, e) for i, e in enumerate(feasible + infeasible + invalid)]
    if not feasible:
        lines.append("\nNo layout fits: add GPUs, lower the micro-batch, or allow recompute/ZeRO.")
    return "\n".join(lines)


def render_json(estimates: list[Estimate], *, top: int, show_infeasible: int) -> str:
    feasible = [e for e in estimates if e.feasible][:top]
    rest = [e for e in estimates if not e.feasible][:show_infeasible]
    return "\n".join(json.dumps(e.as_json()) for e in feasible + rest)
