"""The small in-process training jobs of the step-level tests (test_kernels.py, test_step_knobs.py): a 2-layer
model, 32-token sequences, 4-sequence batches of 2 micro-batches, 2 steps, random tokens; built (and rebuilt, one
case after another) inside a ``run_distributed`` rank."""
from __future__ import annotations

import torch

SEQ, GBS, MBS, STEPS, VOCAB = 32, 4, 2, 2, 256


def make_job(model: dict | None = None, layout: dict | None = None, trainer: dict | None = None,
        optim: dict | None = None, **data):
    """The job with these overrides of the model, the parallel layout, the trainer, the optimizer and the data."""
    from parallel.config import ParallelConfig
    from pretrain.config import DataConfig, JobConfig, OptimConfig, TrainerConfig, WandbConfig
    from pretrain.models.config import ModelConfig

    return JobConfig(
        model=ModelConfig(**{"vocab_size": VOCAB, "num_layers": 2, **(model or {})}),
        data=DataConfig(seq_len=SEQ, **data),
        parallel=ParallelConfig(**(layout or {})),
        # eps 1e-6: Adam divides by sqrt(v) + eps, so with 1e-8 a 1e-9 rounding difference in a near-zero
        # gradient (another kernel's summation order) would move a weight by ~1e-4 (see test_layouts.py).
        optim=OptimConfig(lr=1e-3, eps=1e-6, warmup_steps=0, **(optim or {})),
        trainer=TrainerConfig(**{"steps": STEPS, "micro_batch_size": MBS, "global_batch_size": GBS,
                                 "wandb": WandbConfig(mode="disabled"), "plot_loss": False, **(trainer or {})}),
    )


def batches(n: int) -> list[list[dict[str, torch.Tensor]]]:
    """``n`` global batches (one data-parallel rank: all of it) of random tokens, a quarter of the loss masked."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        mbs = []
        for _ in range(GBS // MBS):
            seq = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
            mbs.append(dict(tokens=seq[:, :-1], labels=seq[:, 1:], loss_mask=(torch.rand(MBS, SEQ, generator=g) > 0.25)
                            .float(), position_ids=torch.arange(SEQ).expand(MBS, SEQ)))
        out.append(mbs)
    return out


def start(job, world_size: int):
    """Validate ``job``, (re)build megatron's parallel state for it and return its train module."""
    from megatron.core import parallel_state as ps

    from parallel.mesh import init_distributed
    from pretrain.build import build_train_module
    from pretrain.config import validate_job

    validate_job(job, world_size=world_size)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(job.parallel, seed=job.trainer.seed)
    return build_train_module(job, vocab_size=VOCAB)
