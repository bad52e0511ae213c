"""Checkpoints survive kill -9, resharding, corruption; the NaN guard skips and stops."""
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.callbacks import drop_rows_after
from pretrain.checkpoint import Checkpointer, verify
from pretrain.testing import write_learnable_shards

REPO = Path(__file__).resolve().parents[2]
COMMON = ["trainer.wandb.mode=disabled", "trainer.log_every=1", "data.seq_len=64", "optim.warmup_steps=2",
          "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.plot_loss=false"]


def command(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", f"data.paths=[{shards}]", f"hydra.run.dir={run_dir}", *COMMON,
            *overrides]


def run(run_dir, shards, *overrides, expect_rc=0) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(run_dir, shards, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_together(shards, *runs: tuple[Path, tuple[str, ...], int]) -> list[subprocess.CompletedProcess]:
    """``run`` for several (run dir, overrides, expected exit status) at once: a one-process run leaves a core
    idle."""
    procs = [subprocess.Popen(command(run_dir, shards, *overrides), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for run_dir, overrides, _ in runs]
    done = []
    for proc, (_, _, expect_rc) in zip(procs, runs):
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == expect_rc, stdout[-3000:] + stderr[-5000:]
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step run twice (before a kill and after the resume) keeps its last value."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def steps_logged(run_dir: Path) -> list[int]:
    """The step of every metrics.jsonl row, in file order."""
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _process_tree(pid: int) -> list:
    """The launcher and every process under it: torchrun starts each rank in a session of its own, out
    of reach of a signal to the launcher's process group."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal(processes: list, sig: int) -> None:
    import psutil

    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def kill_at_step(run_dir, shards, step: int, *overrides) -> None:
    """Start a run and SIGKILL every one of its processes (launcher, torchrun, ranks) once it has logged ``step``.

    The run is frozen (SIGSTOP) while its metrics are read, so it is killed in the state that was read:
    a fast run (DeepSpeed's tiny steps take ~0.1 s) cannot save again or finish between check and kill.
    """
    proc = subprocess.Popen(command(run_dir, shards, *overrides), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    tree = []
    try:
        while time.time() < deadline and proc.poll() is None:
            tree = _process_tree(proc.pid)
            _signal(tree, signal.SIGSTOP)
            if metrics.exists() and step in losses(run_dir):
                break
            _signal(tree, signal.SIGCONT)
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert step in losses(run_dir), "the run never reached the step to kill at"
    finally:
        _signal(tree + _process_tree(proc.pid), signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_learnable_shards(tmp_path_factory.mktemp("shards"), vocab_size=256)


STRAIGHT = ("trainer.steps=8", "trainer.save_every=2", "trainer.keep_last=3")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):
    """``straight(layout)``: the uninterrupted 8-step run of that layout (checkpoints at 2, 4, 6, 8; the last 3
    kept), run on first use and shared: the reference of the resume tests. Saving does not change the losses,
    so it is also the reference of the same job saving at other steps. Returns (run dir, its process)."""
    done: dict = {}

    def get(layout: str) -> tuple[Path, subprocess.CompletedProcess]:
        if layout not in done:
            run_dir = tmp_path_factory.mktemp(f"straight_{layout}")
            done[layout] = run_dir, run(run_dir, shards, f"parallel={layout}", *STRAIGHT)
        return done[layout]

    return get


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["single", "tp2"])
def test_resume_after_kill9_is_bit_identical(tmp_path, shards, straight, layout):
    args = (f"parallel={layout}", *STRAIGHT)
    reference = losses(straight(layout)[0])

    kill_at_step(tmp_path / "killed", shards, 5, *args)  # dies after the step-4 checkpoint
    assert Checkpointer(tmp_path / "killed" / "checkpoints", 3).latest().name == "step_00000004"
    run(tmp_path / "killed", shards, *args)
    resumed = losses(tmp_path / "killed")
    assert steps_logged(tmp_path / "killed") == list(range(1, 9))  # step 5, run twice, is logged once
    assert [resumed[s] for s in range(5, 9)] == [reference[s] for s in range(5, 9)]  # bit-identical


@pytest.mark.timeout(900)
def test_resumed_run_reads_as_one_history_and_saves_leave_nothing_behind(tmp_path, shards, straight):
    """Killed past the step-4 checkpoint with steps 5-6 logged, then resumed: metrics.jsonl holds every step
    once, with an uninterrupted run's losses; a failed save's leftover folder is removed at the start; and
    no save makes megatron-core warn that it overwrites an incomplete checkpoint."""
    args = ("parallel=single", "trainer.steps=8", "trainer.save_every=4")
    straight_dir, straight_proc = straight("single")  # the same job saving every 2 steps
    reference = losses(straight_dir)
    killed = tmp_path / "killed"
    kill_at_step(killed, shards, 6, *args)  # two steps before the next save (8): no save of its own is cut
    ckpts = killed / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert steps_logged(killed)[:6] == list(range(1, 7))
    leftover = ckpts / "step_00000006.tmp"  # what a save cut short by a full disk leaves
    (leftover / "rng").mkdir(parents=True)
    (leftover / "rng" / "rank_00000.pt").write_bytes(b"partial")

    resumed = run(killed, shards, *args)
    assert steps_logged(killed) == list(range(1, 9))
    assert losses(killed) == reference  # steps 5-8 after the resume bit-identical too
    assert not leftover.exists() and not list(ckpts.glob("*.tmp"))
    assert f"removed 1 leftover(s) of unfinished saves in {ckpts}: step_00000006.tmp" in resumed.stdout
    assert re.search(r"metrics\.jsonl: dropped \d rows after step 4, the step this run resumes from", resumed.stdout)
    for proc, saves in ((straight_proc, 4), (resumed, 1)):  # steps 2, 4, 6, 8 / 8: nothing to overwrite
        assert proc.stdout.count("saved checkpoint") == saves
        assert "Overwriting old incomplete" not in proc.stdout + proc.stderr
    # The RNG files are still where a resume reads them, and in the checksums.
    assert "rng/rank_00000.pt" in json.loads((ckpts / "step_00000008" / "checksums.json").read_text())
    assert verify(ckpts / "step_00000008") is None


def test_a_resume_drops_the_rows_after_its_step_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8))
    path.write_text(rows + '{"step": 8, "lo')  # killed mid-write
    drop_rows_after(path, 4)
    assert path.read_text() == "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
    inode = path.stat().st_ino
    drop_rows_after(path, 4)  # nothing past the step: the file is left as it is
    assert path.stat().st_ino == inode
    drop_rows_after(path, 0)  # a run that starts over without a checkpoint keeps none
    assert path.read_text() == ""


def test_leftovers_of_unfinished_saves_are_removed(tmp_path, caplog):
    for name in ("step_00000002", "step_00000004.tmp", "step_00000006.tmp"):
        (tmp_path / name / "rng").mkdir(parents=True)
        (tmp_path / name / "rng" / "rank_00000.pt").write_bytes(b"x")
    (tmp_path / "latest").write_text("step_00000002")
    (tmp_path / "latest.tmp").write_text("step_00000004")
    with caplog.at_level("WARNING", logger="pretrain"):
        Checkpointer(tmp_path, keep_last=2).remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]
    assert caplog.messages == [f"removed 3 leftover(s) of unfinished saves in {tmp_path}: "
                               "step_00000004.tmp, step_00000006.tmp, latest.tmp"]
    caplog.clear()
    Checkpointer(tmp_path, keep_last=2).remove_leftovers()
    assert caplog.messages == []


@pytest.mark.timeout(900)
def test_resharded_resume_continues_with_the_same_loss(tmp_path, shards, straight):
    tp2 = straight("tp2")[0]
    reference = losses(tp2)
    for layout in ("single", "pp2", "cp2"):  # cp2: the same weights, the sequence split over 2 ranks
        run_dir = tmp_path / layout
        (run_dir / "checkpoints").mkdir(parents=True)
        # Start the new layout from the TP2 checkpoint of step 4.
        src = tp2 / "checkpoints" / "step_00000004"
        subprocess.run(["cp", "-r", str(src), str(run_dir / "checkpoints" / src.name)], check=True)
        (run_dir / "checkpoints" / "latest").write_text(src.name)
        run(run_dir, shards, f"parallel={layout}", "trainer.steps=8")  # saves at the end only
        got = losses(run_dir)
        assert sorted(got) == [5, 6, 7, 8]
        for step in (5, 6, 7, 8):
            assert abs(got[step] - reference[step]) <= 1e-5, (layout, step, got[step], reference[step])


@pytest.mark.timeout(600)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, shards, caplog):
    run(tmp_path, shards, "parallel=single", "trainer.steps=4", "trainer.save_every=2")
    ckpts = Checkpointer(tmp_path / "checkpoints", keep_last=2)
    assert ckpts.latest().name == "step_00000004"
    victim = max((p for p in (tmp_path / "checkpoints" / "step_00000004").rglob("*.distcp")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert "truncated" in verify(tmp_path / "checkpoints" / "step_00000004")
    with caplog.at_level("WARNING", logger="pretrain"):  # a new process (a restart) sees the damage
        assert Checkpointer(tmp_path / "checkpoints", keep_last=2).latest().name == "step_00000002"
    assert "step_00000004 is damaged" in caplog.text
    # A resumed run picks the good one and redoes steps 3-4.
    run(tmp_path, shards, "parallel=single", "trainer.steps=4", "trainer.save_every=2")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
    assert verify(tmp_path / "checkpoints" / "step_00000004") is None


@pytest.mark.timeout(600)
def test_pointer_never_names_a_partial_checkpoint_when_killed_mid_save(tmp_path, shards):
    """Kill a run that saves every step at several moments; after each kill, `latest` verifies."""
    args = ("parallel=single", "trainer.steps=400", "trainer.save_every=1", "trainer.keep_last=2")
    for delay in (0.05, 0.13, 0.21, 0.34):
        proc = subprocess.Popen(command(tmp_path, shards, *args), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        pointer = tmp_path / "checkpoints" / "latest"
        start_count = len(losses(tmp_path)) if (tmp_path / "metrics.jsonl").exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and (not (tmp_path / "metrics.jsonl").exists()
                                          or len(losses(tmp_path)) < start_count + 3):
            time.sleep(0.02)
        time.sleep(delay)  # land somewhere inside a save
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        named = tmp_path / "checkpoints" / pointer.read_text()
        assert named.is_dir() and not named.name.endswith(".tmp")
        assert verify(named) is None


@pytest.mark.timeout(300)
def test_nan_steps_are_skipped_and_counted_then_stop(tmp_path, shards):
    _, proc = run_together(
        shards, (tmp_path / "a", ("parallel=single", "trainer.steps=6", "trainer.inject_nan_steps=[3]"), 0),
        (tmp_path / "b", ("parallel=single", "trainer.steps=8", "trainer.save_every=2",
                          "trainer.inject_nan_steps=[3,4,5]", "trainer.max_bad_steps=3"), 3))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    # The skipped step did not advance the schedule: step 4 runs at the LR of schedule position 3
    # (warm-up 2 steps to 1e-3, cosine over 6 steps to 1e-4).
    position3 = 1e-4 + 0.5 * (math.cos(math.pi * (3 - 2) / (6 - 2)) + 1) * (1e-3 - 1e-4)
    assert rows[2]["lr"] == pytest.approx(1e-3) and rows[3]["lr"] == pytest.approx(position3)

    assert "stopping at step 5: 3 consecutive steps" in proc.stderr
    assert "last good checkpoint:" in proc.stderr and "step_00000002" in proc.stderr
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_00000002"
    assert verify(tmp_path / "b" / "checkpoints" / "step_00000002") is None


@pytest.mark.timeout(600)
def test_async_save_publishes_complete_checkpoints_and_resumes_exactly(tmp_path, shards, straight):
    args = ("parallel=single", *STRAIGHT)
    sync = straight("single")[0]  # the same job, saving synchronously
    run(tmp_path / "async", shards, *args, "trainer.async_save=true")
    assert losses(tmp_path / "async") == losses(sync)  # writing in the background changes nothing
    ckpts = tmp_path / "async" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000008"
    assert not list(ckpts.glob("*.tmp")) and verify(ckpts / "step_00000004") is None
    # Resume a fresh run from the asynchronously written step-4 checkpoint.
    (tmp_path / "resume" / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(ckpts / "step_00000004"), str(tmp_path / "resume" / "checkpoints")], check=True)
    (tmp_path / "resume" / "checkpoints" / "latest").write_text("step_00000004")
    run(tmp_path / "resume", shards, *args)
    assert losses(tmp_path / "resume") == {s: losses(sync)[s] for s in (5, 6, 7, 8)}


def _latest_seen_by_rank(rank: int, world_size: int, root: str) -> tuple[str, list[str]]:
    import pretrain.checkpoint as checkpoint

    checked, real_verify = [], checkpoint.verify
    checkpoint.verify = lambda path: checked.append(path.name) or real_verify(path)
    return checkpoint.Checkpointer(Path(root), keep_last=2).latest().name, checked


def test_rank0_alone_verifies_and_every_rank_takes_its_fallback(tmp_path):
    from parallel.testing import run_distributed
    from pretrain.checkpoint import _file_checksums

    for step in (2, 4):
        ckpt = tmp_path / f"step_{step:08d}"
        (ckpt / "rng").mkdir(parents=True)
        (ckpt / "rng" / "rank_00001.pt").write_bytes(os.urandom(1 << 16))
        (ckpt / "checksums.json").write_text(json.dumps(_file_checksums(ckpt)))
    (tmp_path / "latest").write_text("step_00000004")
    victim = tmp_path / "step_00000004" / "rng" / "rank_00001.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    ranks = run_distributed(_latest_seen_by_rank, 2, str(tmp_path), timeout=60)
    assert ranks == [("step_00000002", ["step_00000004", "step_00000002"]), ("step_00000002", [])]


def test_pre_launch_layout_check_judges_the_checkpoint_a_resume_would_load(tmp_path):
    """A damaged newest checkpoint is skipped by the pre-launch check as by the Checkpointer: the layout
    is checked against the fallback it would load (here written by DeepSpeed ZeRO-2 at dp=2)."""
    from common.errors import ConfigError
    from pretrain.checkpoint import _file_checksums, check_run_resumable

    for step, layout in ((2, {"zero_stage": 2, "dp": 2}), (4, {"zero_stage": 2, "dp": 4})):
        ckpt = tmp_path / f"step_{step:08d}"
        ckpt.mkdir()
        (ckpt / "deepspeed.json").write_text(json.dumps(layout))
        (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(1 << 12))
        (ckpt / "checksums.json").write_text(json.dumps(_file_checksums(ckpt)))
    (tmp_path / "latest").write_text("step_00000004")
    check_run_resumable(tmp_path, zero=2, dp=4)  # the intact newest matches
    victim = tmp_path / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"parallel\.zero=2 with parallel\.dp=4 cannot resume .*step_00000002"):
        check_run_resumable(tmp_path, zero=2, dp=4)
    check_run_resumable(tmp_path, zero=2, dp=2)
