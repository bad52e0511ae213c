"""Everything around the loop that is not training: console, loss curve, wandb. Hooks only; no collectives."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import psutil
import secrets
import torch

from pretrain.train_module import StepResult

log = logging.getLogger("pretrain")

def peak_flops() -> float | None:
    """This GPU's dense BF16 peak (``pretrain.plan.hardware``), for MFU; None on the CPU or an unknown GPU."""
    from pretrain.plan.hardware import peak_bf16_flops

    return peak_bf16_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Callback:
    def on_train_start(self, trainer) -> None: ...
    def on_step_end(self, trainer, step: int, result: StepResult, metrics: dict) -> None: ...
    def on_train_end(self, trainer) -> None: ...
    def on_eval(self, trainer, step: int, metrics: dict) -> None: ...  # an evaluation outside a step (at start)
    def on_error(self, trainer, exc: BaseException) -> None: ...


class PlannerVsMeasured(Callback):
    """After the first step (Adam's moments exist), logs this rank's measured model-state bytes beside the
    layout planner's prediction (``python -m pretrain.plan``): a drift shows in every run's log."""

    def __init__(self, job, vocab_size: int) -> None:
        self.job, self.vocab_size, self.done = job, vocab_size, False

    def on_step_end(self, trainer, step, result, metrics) -> None:
        if not self.done:
            from pretrain.plan.check import log_measured

            self.done = True
            try:
                log_measured(trainer.module, self.job, self.vocab_size)
            except Exception as exc:  # noqa: BLE001 - a diagnostic line must never stop a training run
                log.warning("planner vs measured: not available for this layout (%s)", exc)


class Throughput(Callback):
    """Adds tokens/s, MFU and peak memory to the step metrics (the other callbacks read them)."""

    def __init__(self, flops_per_token: float, world_size: int, flops_per_token_causal: float | None = None) -> None:
        self.flops_per_token = flops_per_token  # PaLM convention (attention not causal-discounted)
        self.flops_per_token_causal = flops_per_token_causal  # Megatron-LM's (causal half of attention)
        self.world_size = world_size
        self.peak = peak_flops()
        self._last = time.perf_counter()

    def on_step_end(self, trainer, step, result, metrics) -> None:
        now = time.perf_counter()
        # An evaluation ran inside this step's interval: it is not training time.
        elapsed, self._last = now - self._last - metrics.get("eval/time_s", 0.0), now
        tokens_per_s = result.tokens / max(elapsed, 1e-9)
        metrics["tokens_per_s"] = tokens_per_s
        metrics["step_time_s"] = elapsed
        metrics["peak_mem_gib"] = peak_memory_gib()
        if self.peak:
            metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world_size)
            if self.flops_per_token_causal:
                metrics["mfu_causal"] = tokens_per_s * self.flops_per_token_causal / (self.peak * self.world_size)


class ConsoleLogger(Callback):
    def __init__(self, every: int, total_steps: int) -> None:
        self.every = every
        self.total = total_steps

    def on_step_end(self, trainer, step, result, metrics) -> None:
        if step % self.every and step != self.total and step != 1 and "eval/loss" not in metrics:
            return
        mfu = f" | mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
        if "mfu_causal" in metrics:
            mfu += f" (causal {metrics['mfu_causal']:.1%})"
        skipped = f" | skipped {metrics['skipped_steps']}" if metrics.get("skipped_steps") else ""
        if "moe/load_balancing_loss" in metrics:
            skipped += (f" | aux {metrics['moe/load_balancing_loss']:.4f} | "
                        f"expert load max/mean {metrics['moe/load_imbalance']:.2f}")
        log.info(
            "step %5d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s%s | mem %.2f GiB%s",
            step, self.total, result.loss, result.lr, result.grad_norm, metrics["tokens_per_s"], mfu,
            metrics["peak_mem_gib"], skipped,
        )
        if "eval/loss" in metrics:
            self.on_eval(trainer, step, metrics)

    def on_eval(self, trainer, step, metrics) -> None:
        by_position = " ".join(f"{k.split('_')[-2]}:{v:.3f}" for k, v in metrics.items()
                               if k.startswith("eval/loss_pos_"))
        log.info("eval  %5d/%d | loss %.4f | %d tokens | %.1f s%s", step, self.total, metrics["eval/loss"],
                 metrics["eval/tokens"], metrics["eval/time_s"], f" | by position {by_position}" if by_position else "")


class MetricsFile(Callback):
    """metrics.jsonl (one line per step) and loss_curve.png in the run directory.

    A resumed run first drops the rows past the step it resumed from (steps a crash cut off after the
    last checkpoint, about to be run again), so the file reads as one history with each step once."""

    def __init__(self, run_dir: Path, plot: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss_curve.png"
        self.plot = plot

    def on_train_start(self, trainer) -> None:
        if self.path.exists():  # a fresh start drops everything (its step-0 evaluation too: it runs again)
            drop_rows_after(self.path, trainer.step if trainer.step else -1)

    def on_step_end(self, trainer, step, result, metrics) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "loss": result.loss, "lr": result.lr,
                                "grad_norm": result.grad_norm, **metrics}) + "\n")

    def on_eval(self, trainer, step, metrics) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def on_train_end(self, trainer) -> None:
        if self.plot:
            plot_loss_curve(self.path, self.png)
            log.info("loss curve: %s", self.png)


def drop_rows_after(metrics_path: Path, step: int) -> None:
    """Keep only the rows of steps <= ``step``; replaced atomically, so a kill now loses nothing."""
    lines = metrics_path.read_text().splitlines(keepends=True)
    # A kill mid-write can leave a last line cut short: it is dropped with the steps after ``step``.
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = metrics_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, metrics_path)
    log.info("%s: dropped %d rows after step %d, the step this run resumes from", metrics_path.name,
             len(lines) - len(kept), step)


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, evals, by_position = {}, {}, {}
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:  # not the step-0 evaluation row (trainer.eval_at_start)
            rows[row["step"]] = row["loss"]
        if "eval/loss" in row:
            evals[row["step"]] = row["eval/loss"]
        for key in (k for k in row if k.startswith("eval/loss_pos_")):  # trainer.eval_position_buckets
            by_position.setdefault(key, {})[row["step"]] = row[key]
    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    losses = [rows[s] for s in steps]
    ax.plot(steps, losses, alpha=0.35, label="loss")
    smoothed, ema = [], losses[0] if losses else 0.0
    for value in losses:  # exponential moving average: the trend through per-batch noise
        ema = 0.9 * ema + 0.1 * value if value == value else ema
        smoothed.append(ema)
    ax.plot(steps, smoothed, label="moving average (0.9)")
    if evals:
        ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", label="validation loss")
    for key, series in by_position.items():
        start, end = key.rsplit("_", 2)[-2:]
        ax.plot(sorted(series), [series[s] for s in sorted(series)], "x--", alpha=0.7,
                label=f"validation, positions {start}-{end}")
    ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(metrics_path.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


class WandbLogger(Callback):
    """Offline by default: run files go to <run_dir>/wandb; `wandb sync` uploads them later."""

    def __init__(self, run_dir: Path, *, mode: str, project: str, entity: str | None, group: str | None,
                 name: str, config: dict) -> None:
        import wandb

        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            log.warning("trainer.wandb.mode=online but WANDB_API_KEY is not set: logging offline")
            mode = "offline"
        # A stable id per run directory: a requeued job appends to the same wandb run.
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(dir=str(run_dir), mode=mode, project=project, entity=entity, group=group,
                              name=name, id=run_id, resume="allow", config=config)

    def on_step_end(self, trainer, step, result, metrics) -> None:
        import numpy as np
        import wandb

        row = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm}
        for key, value in metrics.items():
            if key == "moe/expert_tokens":  # a bar per expert: tokens routed to it this step
                counts = np.asarray(value)
                row[key] = wandb.Histogram(np_histogram=(counts, np.arange(len(counts) + 1)))
            else:
                row[key] = value
        self.run.log(row, step=step)

    def on_eval(self, trainer, step, metrics) -> None:
        self.run.log(dict(metrics), step=step)

    def on_train_end(self, trainer) -> None:
        self.run.finish()

    def on_error(self, trainer, exc) -> None:
        self.run.finish(exit_code=1)
