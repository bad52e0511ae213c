"""Raw text -> filtered, deduplicated, tokenized Megatron shards + manifest.json (datatrove underneath).

``python -m data_pipeline [hydra overrides]`` runs it from ``conf/data_job.yaml``; :func:`run_pipeline`
runs it from a :class:`DataPipelineConfig` in Python. Nothing here imports the trainer: the two meet on
disk, through ``manifest.json``.
"""
from data_pipeline.config import DataPipelineConfig
from data_pipeline.pipeline import Summary, run_pipeline

__all__ = ["DataPipelineConfig", "Summary", "run_pipeline"]
