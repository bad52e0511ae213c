"""`python -m pretrain.plan model=qwen2_72b plan.gpus=64 plan.gpu=h100_80gb data.seq_len=4096 ...`

Ranks the parallel layouts of a job by predicted tokens/s per GPU, with the memory and step time of each.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError
from pretrain.plan.config import PlanJobConfig, register_configs

register_configs()


def run(job: PlanJobConfig) -> str:
    from pretrain.plan.hardware import gpu as gpu_spec
    from pretrain.plan.report import render_json, render_table
    from pretrain.plan.search import plan

    p, model = job.plan, job.model
    vocab = p.vocab_size or model.vocab_size
    if vocab is None:
        raise ConfigError(f"model {model.name} takes its vocabulary from the tokenizer: set plan.vocab_size")
    spec = gpu_spec(p.gpu)
    estimates = plan(model, vocab, spec, gpus=p.gpus, seq_len=job.data.seq_len,
                     global_batch_size=job.trainer.global_batch_size, bf16=job.trainer.precision == "bf16",
                     micro_batch_sizes=tuple(p.micro_batch_sizes), recompute=tuple(p.recompute), zero=tuple(p.zero),
                     max_vpp=p.max_vpp, reserved_gib=p.reserved_gib,
                     recompute_modules=tuple(job.trainer.recompute_modules))
    if p.format == "json":
        return render_json(estimates, top=p.top, show_infeasible=p.show_infeasible)
    title = (f"{model.name} on {p.gpus} x {spec.name}, seq {job.data.seq_len}, global batch "
             f"{job.trainer.global_batch_size}, {job.trainer.precision}: {sum(e.feasible for e in estimates)} of "
             f"{len(estimates)} layouts fit (memory per GPU incl. {p.reserved_gib} GiB reserved; time per step)")
    return render_table(estimates, top=p.top, show_infeasible=p.show_infeasible, title=title)


@hydra.main(config_path="pkg://conf", config_name="plan_job", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        job: PlanJobConfig = OmegaConf.to_object(cfg)
        print(run(job))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
