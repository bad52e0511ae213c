"""The planner before launch: a layout predicted not to fit a GPU is a config error; on CPU the prediction is logged.

``check_before_launch(job, layout, tokenizer_vocab)`` is called by the trainer before any process group
starts. On CUDA it looks the device up in the GPU table (by name) and refuses a layout whose predicted
per-GPU memory exceeds it, naming the largest memory term and the fastest layout that fits the same job.
On CPU it logs the prediction; ``log_measured(module, job, vocab)`` logs the measured model states beside it
(after an optimizer step, when Adam's moments exist).
"""
from __future__ import annotations

import dataclasses
import logging

from common.errors import ConfigError
from parallel.layout import ParallelLayout
from pretrain.plan.memory import GiB, Layout, model_states

log = logging.getLogger("pretrain.plan")


def layout_of(job, layout: ParallelLayout) -> Layout:
    """The planner's unit for a job's resolved layout and its step knobs."""
    p, t = job.parallel, job.trainer
    return Layout(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp, ep=layout.ep, etp=layout.etp,
                  dp=layout.dp, sequence_parallel=layout.sequence_parallel, zero=layout.zero,
                  micro_batch_size=t.micro_batch_size, recompute=t.recompute,
                  recompute_modules=tuple(t.recompute_modules), recompute_num_layers=t.recompute_num_layers,
                  overlap_grad_reduce=p.overlap_grad_reduce)


def _device_gpu():
    import torch

    from pretrain.plan.hardware import GPUS

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    for key, spec in GPUS.items():
        family, size = key.split("_")[0], key.split("_")[-1].replace("gb", "")
        if family in name and (size in name or not size.isdigit()):
            return spec
    for key, spec in GPUS.items():
        if key.split("_")[0] in name:
            return spec
    return None


def check_before_launch(job, layout: ParallelLayout, vocab: int, *, gpu=None, log_prediction: bool = True) -> None:
    """ConfigError if the layout is predicted not to fit ``gpu`` (default: this machine's); else log the
    prediction, unless ``log_prediction`` is False (the local launcher: rank 0 logs it, once per job)."""
    from pretrain.models.decoder.model import padded_vocab_size
    from pretrain.plan.search import estimate, plan

    bf16 = job.trainer.precision == "bf16"
    vocab = padded_vocab_size(job.model, vocab, layout.tp)
    lay = layout_of(job, layout)
    gpu = gpu or _device_gpu()
    if gpu is None:  # CPU (or an unknown GPU): log what the planner expects this rank to hold
        if not log_prediction:
            return
        states = model_states(job.model, vocab, lay, bf16=bf16)
        log.info("planner: model states per rank (pipeline rank 0) predicted: weights %.2f MiB, gradients %.2f MiB, "
                 "master weights %.2f MiB, optimizer state %.2f MiB", *(x / 2**20 for x in (
                     states.weights, states.gradients, states.master_weights, states.optimizer_state)))
        return
    est = estimate(job.model, vocab, lay, gpu, seq_len=job.data.seq_len,
                   global_batch_size=job.trainer.global_batch_size, bf16=bf16, reserved_gib=4.0)
    if est.feasible:
        if log_prediction:
            log.info("planner: %.1f GiB per GPU predicted of %.1f (%s)", est.memory["total"], gpu.memory_gib,
                     gpu.name)
        return
    fits = [e for e in plan(job.model, vocab, gpu, gpus=layout.world_size, seq_len=job.data.seq_len,
                            global_batch_size=job.trainer.global_batch_size, bf16=bf16) if e.feasible]
    hint = f"; a layout that fits: {fits[0].layout.describe()}" if fits else "; no layout of this job fits"
    raise ConfigError(f"the layout {lay.describe()} is predicted not to fit a {gpu.name}: {est.reason}{hint} "
                      "(python -m pretrain.plan ranks them all)")


def log_measured(module, job, vocab: int, *, pp_rank: int = 0, dp_rank: int = 0) -> None:
    """Log measured model-state bytes of this rank beside the planner's prediction (call after a step)."""
    from pretrain.plan.measure import model_state_bytes

    measured = model_state_bytes(module)
    predicted = dataclasses.asdict(model_states(job.model, vocab, layout_of(job, module.layout),
                                                bf16=job.trainer.precision == "bf16", pp_rank=pp_rank,
                                                dp_rank=dp_rank))
    log.info("planner vs measured (MiB): " + ", ".join(
        f"{k} {predicted[k] / 2**20:.2f}/{measured[k] / 2**20:.2f}" for k in measured))


__all__ = ["check_before_launch", "log_measured", "layout_of", "GiB"]
