"""Logging handlers that fail once, quietly: a full disk must not turn every log line into a traceback.

The stdlib handlers call ``handleError`` on each failed write, which prints a ``--- Logging error ---``
block per record to stderr (11,222 of them once, when a full disk also held the run log). These say it in
one line on stderr the first time and then stop writing to that destination; the other handlers go on.
Used by Hydra's job logging (``conf/config.yaml``: ``hydra.job_logging.handlers``).
"""
from __future__ import annotations

import logging
import sys


class _ReportOnce:
    """Mixin for a ``logging.StreamHandler``: the first failed write is one stderr line, then the handler is off."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def flush(self) -> None:
        if not self.failed:
            try:
                super().flush()
            except OSError:  # at shutdown; the write that failed was already reported
                self._disable(sys.exc_info()[1])

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a bad format string etc.: the stdlib's report is the useful one
            return super().handleError(record)
        self._disable(error)

    def _disable(self, error: BaseException | None) -> None:
        if self.failed:
            return
        self.failed = True
        name = getattr(self, "baseFilename", None) or getattr(getattr(self, "stream", None), "name", "a stream")
        try:
            sys.stderr.write(f"logging: cannot write to {name} ({error}); no further lines go there\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr is gone too: nothing left to tell


class RunLogHandler(_ReportOnce, logging.FileHandler):
    """The run log (``<run dir>/<job>.log``)."""

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # closing flushes what a full disk refused; already reported
            pass


class ConsoleHandler(_ReportOnce, logging.StreamHandler):
    """The console (stdout), which under Slurm is a file too (``slurm-<job>.out``)."""
