"""A destination that refuses writes (a full disk) is reported once, in one line, and then left alone."""
import errno
import logging

import pytest

from common.log_handlers import ConsoleHandler, RunLogHandler


class FullDiskStream:
    name = "<full disk>"

    def __init__(self) -> None:
        self.writes = 0

    def write(self, text: str) -> None:
        self.writes += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None: ...


@pytest.fixture
def logger():
    logger = logging.getLogger("test_log_handlers")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("destination", ["stream", "/dev/full"])
def test_a_full_disk_is_one_stderr_line_and_the_other_handlers_go_on(logger, capsys, destination):
    if destination == "stream":
        stream = FullDiskStream()
        failing = ConsoleHandler(stream)
    else:  # a real file whose every write fails with ENOSPC
        failing = RunLogHandler(destination)
    healthy = Collect()
    logger.addHandler(failing)
    logger.addHandler(healthy)
    for i in range(500):
        logger.info("step %d", i)
    failing.close()  # closing flushes again: still nothing more on stderr

    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("logging: cannot write to ") and "No space left on device" in err
    assert "--- Logging error ---" not in err
    assert failing.failed
    assert healthy.messages == [f"step {i}" for i in range(500)]
    if destination == "stream":
        assert stream.writes == 1  # switched off after the first failure, not retried per record


def test_a_healthy_run_log_writes_every_line(logger, tmp_path, capsys):
    handler = RunLogHandler(tmp_path / "run.log")
    logger.addHandler(handler)
    for i in range(3):
        logger.info("step %d", i)
    handler.close()
    assert (tmp_path / "run.log").read_text().splitlines() == ["step 0", "step 1", "step 2"]
    assert capsys.readouterr().err == "" and not handler.failed


def test_a_format_error_is_still_reported_by_the_stdlib(logger, capsys):
    handler = ConsoleHandler(FullDiskStream())
    logger.addHandler(handler)
    logger.info("%d", "not a number")  # a programming error, not a full disk: keep the stdlib's report
    assert "--- Logging error ---" in capsys.readouterr().err and not handler.failed
