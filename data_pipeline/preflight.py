"""Checks that must pass before anything is written: the output directory can be created and written.

Hydra creates its run directory (``<output_dir>/hydra/<time>``, conf/data_job.yaml) before the job
function starts, so a bad ``output_dir`` would surface as Hydra's traceback: :class:`OutputDirCheck` runs
the same check from Hydra's ``on_run_start`` callback, which comes first.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback

from common.cli import exit_bad_input
from common.errors import ConfigError


def check_output_dir(output_dir: str) -> Path:
    """Create ``output_dir`` (and its parents) and write a probe file in it; a ConfigError naming
    ``data_pipeline.output_dir`` and the cause otherwise. Returns the absolute path."""
    root = Path(output_dir).expanduser().absolute()
    field = f"data_pipeline.output_dir={output_dir!r}"
    existing = next(p for p in (root, *root.parents) if p.exists())  # "/" always exists
    if not existing.is_dir():
        raise ConfigError(f"{field} cannot be created: {existing} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise ConfigError(f"{field} cannot be written: {exc.strerror or exc} ({exc.filename or root})") from exc
    return root


class OutputDirCheck(Callback):
    """Hydra callback (conf/data_job.yaml): :func:`check_output_dir` before Hydra creates its run directory
    there. One ``config error:`` line and exit status 2, as the job's own checks."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            check_output_dir(str(config.data_pipeline.output_dir))
        except ConfigError as exc:  # SystemExit: Hydra lets it through, before its run directory exists
            exit_bad_input("config error", exc)
