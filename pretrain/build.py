"""Assemble a Trainer from a validated JobConfig, in the order things must happen (docs/architecture.md)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path

import torch.distributed as dist
from megatron.core.transformer.module import Float16Module

from parallel.data import apply_ddp
from parallel.layout import ParallelLayout
from parallel.mesh import Mesh, is_logging_rank
from pretrain.callbacks import ConsoleLogger, MetricsFile, PlannerVsMeasured, Throughput, WandbLogger
from pretrain.checkpoint import Checkpointer, check_resumable
from pretrain.config import JobConfig
from pretrain.data import Shards, build_datasets, microbatches
from pretrain.models import registry, rope_scaling
from pretrain.models.decoder.model import padded_vocab_size, resolve_kernels
from pretrain.optim import build_optimizer
from pretrain.preflight import check_resume_shape, vocab_padding_note
from pretrain.train_module import BaseTrainModule, TrainModule
from pretrain.trainer import Trainer

log = logging.getLogger("pretrain")


def build_train_module(job: JobConfig, vocab_size: int, *, layout: ParallelLayout | None = None,
                       init_weights: bool = True) -> BaseTrainModule:
    """This rank's train module, built in the order each technique must be applied (process groups must exist).

    ``layout``: the job's resolved layout (``Mesh.layout``); None resolves ``job.parallel`` on this process
    group's world size. ``parallel.zero`` 2/3 hands the (single, tp = pp = 1) chunk to DeepSpeed instead of
    megatron's DDP + optimizer: a ``DeepSpeedTrainModule``, the same ``BaseTrainModule`` interface.
    Every step below (and every ``apply_*`` step of ``transformer_config``) logs one line of what it applied.
    """
    layout = layout or ParallelLayout.resolve(job.parallel, world_size=dist.get_world_size())
    t, family = job.trainer, registry.get(job.model.family)
    kernels = resolve_kernels(t)  # trainer.fused_swiglu / cross_entropy / moe_grouped_gemm, auto resolved
    # 1. megatron's TransformerConfig: the model's shape, then the layout (TP/SP/PP/VPP/CP/EP/ETP), MoE routing and
    #    loss scaling, precision, recompute and kernels, one named step each (decoder.model.transformer_config).
    config = family.transformer_config(job.model, layout=layout, moe_dispatcher=job.parallel.moe_dispatcher,
                                       precision=t.precision, recompute=t.recompute_config, kernels=kernels)
    # TrainModule's loss is a per-token sum that megatron divides by the global token count; DDP reads
    # this flag when it is built to sum (not average) gradients over dp. Set later, gradients and the
    # reported norm came out dp times too small and clipping acted at dp x optim.clip_grad.
    config.calculate_per_token_loss = True
    # 2. This rank's model chunks: megatron splits the layers, heads and experts as the config says.
    ce_chunk = t.cross_entropy_chunk if kernels["cross_entropy"] == "chunked" else 0
    chunks = family.build_model_chunks(job.model, config, vocab_size, cross_entropy_chunk=ce_chunk)
    # 3. Pretrained weights: before the optimizer copies them.
    if init_weights and job.model.init_from is not None:
        apply_init_from(chunks, job.model)
    # 4. torch.compile: on the bare GPTModels, before any wrapper (compilation itself happens at the first step).
    if t.compile:
        from pretrain.models.decoder.compile import apply_compile

        apply_compile(chunks, moe=job.model.is_moe)
    # 5. ZeRO-2/3: DeepSpeed keeps its own bf16 copy, fp32 master partitions and optimizer; the build ends here.
    if layout.deepspeed:
        from pretrain.deepspeed_module import build_deepspeed_train_module

        (model,) = chunks
        return build_deepspeed_train_module(job, layout, config, model)
    # 6. bf16 weights and activations (the optimizer keeps fp32 master copies).
    if t.precision == "bf16":
        chunks = apply_bf16(chunks, config)
    # 7. Data parallel: megatron-core DDP, ZeRO-1 buffers for the distributed optimizer.
    chunks = apply_ddp(chunks, config, zero=layout.zero, overlap_grad_reduce=job.parallel.overlap_grad_reduce)
    # 8. The optimizer and its LR schedule, over the DDP buffers.
    optimizer, scheduler = build_optimizer(job.optim, chunks, bf16=t.precision == "bf16", zero=layout.zero,
                                           total_steps=t.steps)
    moe_stats = None
    if job.model.is_moe:
        from pretrain.moe_stats import MoEStats

        moe_stats = MoEStats(chunks, job.model.num_layers, job.model.num_experts, tp=layout.tp,
                             sequence_parallel=layout.sequence_parallel)
    return TrainModule(chunks, config, optimizer, scheduler, layout=layout, seq_len=job.data.seq_len,
                       micro_batch_size=t.micro_batch_size, moe_stats=moe_stats)


def apply_init_from(chunks: list, model) -> None:
    """``model.init_from``: overwrite the freshly built chunks with pretrained weights (HF dir or checkpoint)."""
    from pretrain.convert import init_chunks_from

    init_chunks_from(chunks, model, model.init_from)
    if is_logging_rank():
        log.info("pretrained weights: %s", model.init_from)


def apply_bf16(chunks: list, config) -> list:
    """Wrap each chunk in megatron's ``Float16Module`` (bf16 parameters; inputs cast, fp32 logits out)."""
    if is_logging_rank():
        log.info("bf16: Float16Module on %d chunk%s", len(chunks), "s" if len(chunks) > 1 else "")
    return [Float16Module(config, chunk) for chunk in chunks]


def build_trainer(job: JobConfig, run_dir: Path, mesh: Mesh, shards: Shards) -> Trainer:
    t, layout = job.trainer, mesh.layout
    vocab_size = padded_vocab_size(job.model, shards.vocab_size, layout.tp)
    checkpointer = Checkpointer(run_dir / "checkpoints", t.keep_last, async_save=t.async_save,
                                rope=rope_scaling.record(job.model))
    checkpointer.remove_leftovers()  # step_*.tmp of saves a crash or a full disk cut short
    # Collective: rank 0 verifies the checkpoints and every rank gets its choice, so a layout that cannot load
    # it is refused on every rank alike, before any model is built (cached: resuming does not re-verify it).
    latest = checkpointer.latest()
    if latest is not None:
        check_resumable(latest, zero=layout.zero, dp=layout.dp)
        check_resume_shape(latest, job.model, vocab_size)  # one line naming the field, not megatron's traceback
    # A run that resumes overwrites the weights anyway: skip loading pretrained ones.
    module = build_train_module(job, vocab_size, layout=layout, init_weights=latest is None)
    valid_samples = t.eval_steps * t.global_batch_size if t.eval_every else 0
    train_set, valid_set = build_datasets(job.data, shards, seed=t.seed, train_samples=t.steps * t.global_batch_size,
                                          valid_samples=valid_samples, cache_dir=str(run_dir / "data_cache"))

    def batches_from(step: int, dataset=train_set):
        return microbatches(dataset, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                            dp_rank=mesh.dp_rank, dp_size=mesh.dp, start_step=step)

    def eval_batches():  # the same first eval_steps global batches of the validation set, every time
        return itertools.islice(batches_from(0, valid_set), t.eval_steps)

    if mesh.is_logging_rank:
        if note := vocab_padding_note(job.model, shards.vocab_size, layout.tp):
            log.info(note)

        count = registry.get(job.model.family).param_count(job.model, vocab_size)
        log.info("model %s: %.2fM parameters (%.2fM active), vocab %d | %d train samples of %d tokens | "
                 "%d microbatches of %d per step", job.model.name, count.total / 1e6, count.active / 1e6, vocab_size,
                 len(train_set), job.data.seq_len, t.global_batch_size // (t.micro_batch_size * mesh.dp),
                 t.micro_batch_size)
        if t.eval_every:
            log.info("validation: %d samples, %d batches of %d every %d steps and at the end", len(valid_set),
                     t.eval_steps, t.global_batch_size, t.eval_every)
    flops_per_token = registry.get(job.model.family).flops_per_token
    callbacks = [Throughput(flops_per_token(job.model, job.data.seq_len, vocab_size), mesh.world_size,
                            flops_per_token(job.model, job.data.seq_len, vocab_size, causal=True))]
    if mesh.is_logging_rank:
        callbacks += [ConsoleLogger(t.log_every, t.steps), MetricsFile(run_dir, t.plot_loss),
                      PlannerVsMeasured(job, vocab_size)]
        if t.wandb.mode != "disabled":
            callbacks.append(WandbLogger(
                run_dir, mode=t.wandb.mode, project=t.wandb.project, entity=t.wandb.entity, group=t.wandb.group,
                name=t.run_name, config=dataclasses.asdict(job),
            ))
    return Trainer(module=module, batches_from=batches_from, checkpointer=checkpointer,
                   callbacks=callbacks, mesh=mesh, steps=t.steps, save_every=t.save_every,
                   max_bad_steps=t.max_bad_steps, inject_nan_steps=tuple(t.inject_nan_steps),
                   eval_batches=eval_batches if t.eval_every else None, eval_every=t.eval_every,
                   eval_position_buckets=t.eval_position_buckets, eval_at_start=t.eval_at_start)
