"""`python -m pretrain [hydra overrides]`: train Qwen2 on token shards.

Run bare, it starts the processes its parallel layout needs on this machine (torchrun underneath);
under torchrun or srun it joins the job those launchers started.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

# Known, harmless library noise: apex/TransformerEngine absent (torch kernels stand in by design),
# torch's renamed collectives that megatron-core still calls, a megatron-core config deprecation.
for _message in (".*(Apex|Transformer Engine).*", ".*reduce_scatter_tensor.*", ".*all_gather_into_tensor.*",
                 "full scope is deprecated.*", "The .grad attribute of a Tensor that is not a leaf.*",
                 # trainer.recompute_modules=[core_attn]: megatron-core's advice for TransformerEngine users.
                 "If you are using transformer_engine as the transformer implementation.*"):
    warnings.filterwarnings("ignore", message=_message)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from common.cli import one_line_errors, to_object
from common.errors import ConfigError, DataError, TrainingDivergedError
from parallel.launch import launched, local_world_size, relaunch_local
from pretrain import preflight
from pretrain.checkpoint import check_run_resumable
from pretrain.config import JobConfig, register_configs, validate_job
from pretrain.data import Shards, check_blend
from pretrain.plan.check import check_before_launch

log = logging.getLogger("pretrain")
register_configs()


def _launch_local(nproc: int, run_dir: Path, extra_overrides: list[str]) -> None:
    """Re-run this job's overrides under torchrun with ``nproc`` processes on this machine."""
    overrides = list(HydraConfig.get().overrides.task) + extra_overrides
    rc = relaunch_local("pretrain", [*overrides, f"hydra.run.dir={run_dir}"], nproc)
    if rc != 0:
        raise LaunchError(rc, f"the {nproc} training processes exited with status {rc} (their log is above)")


class LaunchError(Exception):
    def __init__(self, returncode: int, message: str) -> None:
        super().__init__(message)
        self.returncode = returncode


def run(job: JobConfig, run_dir: Path, resolved_config: str | None = None) -> None:
    """Validate, start process groups, train, tear down. Everything a rank does, in order.
    ``resolved_config``: yaml written to the run directory once the job's inputs passed their checks."""
    from parallel.mesh import destroy_distributed, init_distributed, world_size_from_env

    # The one resolution and validation of the layout; build_trainer checks the checkpoint it would resume from.
    layout = validate_job(job, world_size_from_env())
    shards = Shards.from_config(job.data)  # a missing data path fails here, before any process group
    # Shards, vocabulary, init_from; the shape of the checkpoint it resumes from is checked in build_trainer,
    # after the ranks chose it together (verifying it here would read it once per rank).
    preflight.check_job(job, resumes=preflight.has_checkpoint(run_dir / "checkpoints"))
    # A split part with no documents is refused; the plan is kept, so build_datasets reads no .idx again.
    shards = shards.with_blend(check_blend(job.data, shards, validation=bool(job.trainer.eval_every)))
    check_before_launch(job, layout, shards.vocab_size)  # predicted not to fit the GPU: refused
    if resolved_config is not None:  # only now: a refused job leaves the run directory as it was
        (run_dir / "resolved_config.yaml").write_text(resolved_config)
    mesh = init_distributed(layout, seed=job.trainer.seed, timeout_s=job.parallel.timeout_s)
    try:
        from pretrain.build import build_trainer

        trainer = build_trainer(job, run_dir, mesh, shards)
        trainer.resume_if_possible()
        trainer.fit()
    finally:
        destroy_distributed()


@one_line_errors  # Hydra's own config errors: one `config error:` line, exit 2
@hydra.main(config_path="pkg://conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # our own lines summarise what it would log
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        job: JobConfig = to_object(cfg)
        sweep_overrides = []
        if sweeping and job.trainer.wandb.group is None:
            # The runs of one sweep share a wandb group; each gets its own run name.
            job.trainer.wandb.group = job.trainer.run_name
            job.trainer.run_name = f"{job.trainer.run_name}-{hydra_cfg.job.num}"
            sweep_overrides = [f"trainer.wandb.group={job.trainer.wandb.group}",
                               f"trainer.run_name={job.trainer.run_name}"]
            for override in sweep_overrides:  # resolved_config.yaml shows the names this point used
                OmegaConf.update(cfg, *override.split("=", 1))
        nproc = local_world_size(job.parallel)
        if not launched() and nproc > 1:
            layout = validate_job(job, nproc)  # refuse a bad layout before starting any process
            latest = check_run_resumable(run_dir / "checkpoints", zero=layout.zero, dp=layout.dp)
            preflight.check_job(job, resume_from=latest)  # every check a rank would make, before any starts
            shards = Shards.from_config(job.data)
            check_blend(job.data, shards, validation=bool(job.trainer.eval_every))
            # Refuses a layout that cannot fit; the prediction itself is logged by rank 0 (every launch has one).
            check_before_launch(job, layout, shards.vocab_size, log_prediction=False)
            _launch_local(nproc, run_dir, sweep_overrides)
            return
        run(job, run_dir, OmegaConf.to_yaml(cfg, resolve=True) if rank == 0 else None)
    except (ConfigError, DataError, TrainingDivergedError, LaunchError) as exc:
        if sweeping:
            raise  # the launcher (basic or submitit) records the failed job; exiting would hang submitit
        if isinstance(exc, (ConfigError, DataError)):
            print(f"{'config' if isinstance(exc, ConfigError) else 'data'} error: {exc}", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, TrainingDivergedError):
            print(f"training stopped: {exc}", file=sys.stderr)
            sys.exit(3)
        sys.exit(exc.returncode)

if __name__ == "__main__":
    if any(arg.startswith("recipe=") for arg in sys.argv[1:]):  # staged runs: pretrain/recipe.py
        from pretrain.recipe import main as run_recipe

        run_recipe()
    else:
        main()
