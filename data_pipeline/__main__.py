"""`python -m data_pipeline [hydra overrides]` (console script `qwen-data`): build token shards.

    python -m data_pipeline                                       # the shipped sample corpus
    python -m data_pipeline data_pipeline.input.paths=[/data/crawl] data_pipeline.output_dir=outputs/data/crawl
    python -m data_pipeline data_pipeline.tokenizer.source=qwen2 data_pipeline.executor.kind=slurm
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from common.cli import one_line_errors, to_object
from common.errors import ConfigError, DataError
from data_pipeline.config import DataJobConfig, register_configs

log = logging.getLogger("data_pipeline")
register_configs()


@one_line_errors  # Hydra's own config errors: one `config error:` line, exit 2
@hydra.main(config_path="pkg://conf", config_name="data_job", version_base=None)
def main(cfg: DictConfig) -> None:
    from data_pipeline.pipeline import run_pipeline

    try:
        job: DataJobConfig = to_object(cfg)
        summary = run_pipeline(job.data_pipeline)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(summary.table())


if __name__ == "__main__":  # datatrove's worker pool (forkserver) re-imports this module: keep the guard
    main()
