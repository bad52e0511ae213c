"""slurm/pretrain.sh across the simulated cluster (up.sh --nodes 3): every layout, checkpoint, preemption
and node loss of a 2-node job gives the losses of the same run on one node.

The runs are submitted at once (``runs``: the parity runs and the preempted run) and shared by the tests; all
use the same config (``STEPS`` steps, so the same LR schedule) and their own run names. Losses come from each
run's metrics.jsonl; a step logged twice (replayed after a crash) counts with its last value.

The node failure drills take node mn3 down, a node no other job uses (they exclude it): they run in the
background (``node_loss``) on mn1 + mn3 while the other tests use mn1 + mn2, and their tests come last.
"""
from __future__ import annotations

import json
import re
import shutil
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
VICTIM = "mn3"  # the node the failure drills take down
ELSEWHERE = (f"--exclude={VICTIM}",)  # every other job
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}

STEPS = 40
BASE = ["model=qwen2_tiny", "data.seq_len=64", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
        "trainer.log_every=1", "trainer.wandb.mode=disabled", "trainer.plot_loss=false", "trainer.eval_every=0",
        f"trainer.steps={STEPS}", "trainer.save_every=20"]
# Short parity runs of the model-parallel layouts (their own schedule: compared only with each other).
SHORT = [*BASE[:-2], "trainer.steps=3", "trainer.save_every=0"]
# name: (nodes, ranks per node, overrides)
RUNS = {
    "dp-2nodes": (2, 1, ["parallel=single", *BASE]),
    "dp-1node": (1, 2, ["parallel=single", *BASE]),
    "tp2dp-2nodes": (2, 2, ["parallel=tp2", *SHORT]),
    "tp2dp-1node": (1, 4, ["parallel=tp2", *SHORT]),
    "pp2-2nodes": (2, 1, ["parallel=pp2", *SHORT]),
    "pp2-1node": (1, 2, ["parallel=pp2", *SHORT]),
}
NODE_LOSS_BOUND_S = 60  # documented in docs/slurm.md: SlurmdTimeout=6 + the controller's ping and kill
COLLECTIVE_TIMEOUT_S = 30  # parallel.timeout_s of the node-loss runs (does not change the losses)
# A killed node stays down this long, as a crashed machine that reboots. (Slurm's cleanup of the lost
# run can reach the returning node after the requeued job, same id, started there: pretrain.sh waits
# REQUEUE_SETTLE_S before a multi-node restart launches; see docs/slurm.md.)
NODE_DOWN_S = 75


class Run:
    """A run of slurm/pretrain.sh; ``where``: sbatch's node options. Its processes run at the lowest CPU
    priority (``runs_dir``), but for the node failure drills (``drill``)."""

    def __init__(self, slurm, runs_dir: Path, name: str, nodes: int, nproc: int, overrides: list[str],
                 data: Path, where: tuple[str, ...] = ELSEWHERE, drill: bool = False) -> None:
        self.slurm, self.dir, self.name = slurm, runs_dir / name, name
        env = {"RUNS_DIR": str(runs_dir)}
        if not drill:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(runs_dir / "low_priority"),
                                                            os.environ.get("PYTHONPATH")) if p)
        self.job = slurm.submit("--time=15", f"--nodes={nodes}", *where, "slurm/pretrain.sh", "--nproc-per-node",
                                str(nproc), *overrides, f"data.paths=[{data}]", f"trainer.run_name={name}", env=env)
        self.log = self.dir / f"slurm-{self.job}.out"

    def wait(self, until=lambda info: info.get("JobState") in TERMINAL, timeout: float = 400) -> dict[str, str]:
        return self.slurm.wait(self.job, until, timeout=timeout, log=self.log)

    def completed(self) -> "Run":
        info = self.wait()
        assert info["JobState"] == "COMPLETED", self.text()[-4000:]
        return self

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def losses(self) -> dict[int, float]:
        """step -> loss from metrics.jsonl; a replayed step keeps its last value."""
        path = self.dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        return {row["step"]: row["loss"] for row in rows}

    def latest(self) -> str:
        path = self.dir / "checkpoints" / "latest"
        return path.read_text().strip() if path.exists() else ""

    def starts(self) -> list[tuple[int, str, int]]:
        """(restart count, node list, checkpoint step at start) of each start, from slurm_jobs.log."""
        text = (self.dir / "slurm_jobs.log").read_text()
        return [(int(r), n, int(s)) for r, n, s in re.findall(r"restart (\d+) on (\S+) .*from step (\d+)", text)]


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multinode_runs")
    # Every process of every job but the node failure drills runs at the lowest CPU priority: the drills'
    # collectives time out after COLLECTIVE_TIMEOUT_S, which a checkpoint save starved by a dozen busy ranks on
    # 2 cores exceeds. Python imports sitecustomize from PYTHONPATH at start; torchrun puts each rank in a session
    # of its own, and Linux's autogroups share the CPU between sessions whatever their processes' nice value, so
    # it lowers its session's too.
    (path / "low_priority").mkdir()
    (path / "low_priority" / "sitecustomize.py").write_text(
        "import os\n"
        "try:\n"
        "    with open('/proc/self/autogroup', 'w') as f:\n"
        "        f.write('19')\n"
        "except OSError:\n"
        "    pass\n"
        "os.nice(19)\n")
    return path


@pytest.fixture(scope="session")
def runs(multinode, shards, runs_dir, node_loss) -> dict[str, Run]:
    """All parity runs and the preempted run, submitted together (the cluster runs them side by side, next to
    the node failure drills); the preempted run gets its SIGUSR1 here, once it has logged 3 steps."""
    out = {name: Run(multinode, runs_dir, name, nodes, nproc, overrides, shards)
           for name, (nodes, nproc, overrides) in RUNS.items()}
    run = out["preempted-2nodes"] = Run(multinode, runs_dir, "preempted-2nodes", 2, 1, ["parallel=single", *BASE],
                                        shards)
    wait_until(lambda: len(run.losses()) >= 3, 300, "3 steps", run)
    multinode.run("scancel", "--signal=USR1", "--batch", run.job)
    return out


RESUMES = [("dp-2nodes", 1, 2), ("dp-1node", 2, 1)]  # source run, nodes and ranks per node of its resume


@pytest.fixture(scope="session")
def resumed(runs, multinode, shards) -> dict[str, Run]:
    """The step-20 checkpoint of each dp run resumed on the other node count, both submitted together."""
    out = {}
    for source, nodes, nproc in RESUMES:
        reference = runs[source].completed()
        name = f"{source}-resumed-on-{nodes}"
        resume_copy(reference, name, at_step=20)
        out[source] = Run(multinode, reference.dir.parent, name, nodes, nproc, ["parallel=single", *BASE], shards)
    return out


def resume_copy(run: Run, name: str, at_step: int) -> Path:
    """A copy of ``run``'s directory as it was after step ``at_step`` (a kept checkpoint): ``latest`` and
    metrics.jsonl cut back there, as after a crash just after that save."""
    dest = run.dir.parent / name
    shutil.copytree(run.dir, dest, ignore=shutil.ignore_patterns("slurm*", ".hydra", "*.log", "resolved_config.yaml"))
    (dest / "checkpoints" / "latest").write_text(f"step_{at_step:08d}\n")
    for later in (dest / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > at_step:
            shutil.rmtree(later)
    rows = [line for line in (dest / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= at_step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))
    return dest


def wait_until(condition, timeout: float, what: str, run: Run) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen after {timeout:.0f} s\n{run.text()[-4000:]}")
        time.sleep(0.2)


def node_state(slurm, node: str) -> str:
    return slurm.run("sinfo", "-h", "-N", "-n", node, "-o", "%T").stdout.strip()


@pytest.mark.timeout(120)
def test_nodes_have_their_own_names_and_addresses(multinode):
    start = time.monotonic()
    proc = multinode.up()
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 10 and "starting" not in proc.stdout, proc.stdout  # idempotent
    out = multinode.run("srun", "--nodes=3", "--ntasks-per-node=1", "--label", "sh", "-c",
                        'echo $(hostname) $(getent ahostsv4 $(hostname) | head -1 | cut -d" " -f1)').stdout
    assert sorted(out.split("\n")[:3]) == ["0: mn1 10.250.0.1", "1: mn2 10.250.0.2", "2: mn3 10.250.0.3"], out


@pytest.mark.timeout(120)
def test_unreachable_head_node_fails_fast_with_one_line(multinode, shards, runs_dir):
    # An address of the cluster's private subnet that no node holds: nothing answers there.
    start = time.monotonic()
    job = multinode.submit("--time=5", "--nodes=2", *ELSEWHERE, "slurm/pretrain.sh", "--nproc-per-node", "1",
                           "parallel=single", f"data.paths=[{shards}]", "trainer.run_name=unreachable",
                           env={"RUNS_DIR": str(runs_dir), "MASTER_ADDR": "10.250.0.99", "HEAD_PROBE_TIMEOUT": "3"})
    log = runs_dir / "unreachable" / f"slurm-{job}.out"
    info = multinode.wait(job, timeout=90, log=log)
    assert info["JobState"] == "FAILED"
    assert time.monotonic() - start < 60
    text = log.read_text()
    assert "launch error: node mn2 cannot reach the head node at 10.250.0.99:" in text, text[-3000:]


@pytest.mark.timeout(600)
def test_data_parallel_across_nodes_equals_one_node(runs):
    two, one = runs["dp-2nodes"].completed(), runs["dp-1node"].completed()
    assert "2 node(s) x 1 ranks" in two.text() and "dp=2" in two.text()
    assert two.starts()[0][1] == "mn[1-2]"
    assert list(two.losses()) == list(range(1, STEPS + 1))
    assert two.losses() == one.losses()  # bit for bit: the same reduction over the same 2 ranks


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout, describe", [("tp2dp", "tp=2 pp=1 dp=2"), ("pp2", "tp=1 pp=2 dp=1")])
def test_model_parallel_layouts_across_nodes_equal_one_node(runs, layout, describe):
    two, one = runs[f"{layout}-2nodes"].completed(), runs[f"{layout}-1node"].completed()
    assert describe in two.text(), two.text()[-3000:]
    assert two.starts()[0][1] == "mn[1-2]"
    assert list(two.losses()) == [1, 2, 3]
    assert two.losses() == one.losses()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("source, nodes, nproc", RESUMES)
def test_checkpoint_resumes_on_another_node_count(runs, resumed, source, nodes, nproc):
    reference = runs[source].completed()
    run = resumed[source].completed()
    assert run.starts()[0][2] == 20
    assert run.losses() == reference.losses()  # steps 21..40 equal the uninterrupted run's


@pytest.mark.timeout(600)
def test_preemption_across_nodes_saves_one_step_everywhere_and_resumes_identically(runs):
    # Signalled with `scancel --signal=USR1 --batch` after 3 steps (the runs fixture).
    reference = runs["dp-2nodes"].completed()
    run = runs["preempted-2nodes"].completed()
    text = run.text()
    saved = [int(s) for s in re.findall(r"stop signal received: saving at step (\d+)", text)]
    assert len(saved) == 2 and saved[0] == saved[1], saved  # both ranks, one on each node, the same step
    stop = saved[0]
    assert 3 <= stop < STEPS
    assert f"checkpoint at step {stop} of {STEPS}: requeueing job {run.job}" in text
    assert [(r, s) for r, _, s in run.starts()] == [(0, 0), (1, stop)]
    assert all(nodes == "mn[1-2]" for _, nodes, _ in run.starts())
    rng = sorted(p.name for p in (run.dir / "checkpoints" / f"step_{stop:08d}" / "rng").iterdir()) \
        if (run.dir / "checkpoints" / f"step_{stop:08d}").exists() else None
    assert rng in (None, ["rank_00000.pt", "rank_00001.pt"])  # (pruned by keep_last once training went on)
    # Every step exactly once, and the resumed steps bit for bit those of the uninterrupted run.
    steps = [json.loads(line)["step"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert run.losses() == reference.losses()


@pytest.mark.timeout(400)
def test_data_stage_on_two_nodes_equals_one_node(multinode, tmp_path):
    from data_pipeline import run_pipeline
    from data_pipeline.config import DedupConfig, ExecutorConfig, MinhashConfig, SlurmConfig
    from data_pipeline.testing import small_config, write_corpus

    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    write_corpus(inputs[0], good=10, exact_dups=2)
    write_corpus(inputs[1], good=8, exact_dups=1)
    # 5 of a node's 8 CPUs per task: the 2 tasks of each stage run on different nodes (not on mn3, the drills').
    slurm_cfg = ("SlurmConfig(partition='mn', time='00:10:00', cpus_per_task=5, mem_per_cpu_gb=1, "
                 f"sbatch_args={{'exclude': {VICTIM!r}}})")
    script = tmp_path / "submit.py"
    script.write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from data_pipeline import run_pipeline\n"
        "from data_pipeline.config import DedupConfig, ExecutorConfig, MinhashConfig, SlurmConfig\n"
        "from data_pipeline.testing import small_config\n"
        f"cfg = small_config([Path(p) for p in {[str(p) for p in inputs]!r}], Path({str(tmp_path / 'two')!r}), "
        "vocab_size=400, dedup=DedupConfig(exact=True, minhash=MinhashConfig(enabled=False)), "
        f"executor=ExecutorConfig(kind='slurm', tasks=2, slurm={slurm_cfg}))\n"
        "print(json.dumps(run_pipeline(cfg).slurm_jobs))\n")
    proc = multinode.run("python", str(script), timeout=120)
    jobs = json.loads(proc.stdout.strip().splitlines()[-1])
    multinode.jobs += jobs
    deadline = time.monotonic() + 300
    while set(multinode.run("squeue", "-h", "-o", "%A").stdout.split()) & set(jobs):
        assert time.monotonic() < deadline, multinode.run("squeue").stdout
        time.sleep(2)
    two = tmp_path / "two"
    assert (two / "manifest.json").exists(), "\n".join(p.read_text()[-1500:] for p in two.rglob("*.out"))
    # The 2-task stages ran on both nodes.
    nodes = set()
    for job in jobs:
        out = multinode.run("scontrol", "show", "job", "-o", job).stdout
        nodes |= set(re.findall(r" NodeList=(mn\d)", out))
    assert nodes == {"mn1", "mn2"}, nodes

    one = tmp_path / "one"
    run_pipeline(small_config(inputs, one, vocab_size=400, dedup=DedupConfig(exact=True, minhash=MinhashConfig(enabled=False)),
                              executor=ExecutorConfig(kind="local", tasks=2)))
    manifest_two, manifest_one = (json.loads((d / "manifest.json").read_text().replace(str(d), "<out>"))
                                  for d in (two, one))
    assert manifest_two == manifest_one
    for shard in manifest_one["shards"]:
        for suffix in (".bin", ".idx"):
            assert (two / f"{shard['prefix']}{suffix}").read_bytes() == (one / f"{shard['prefix']}{suffix}").read_bytes()
    stats_two, stats_one = (json.loads((d / "stats.json").read_text()) for d in (two, one))
    counts = lambda stats: [(s["stage"], s.get("dropped"), s.get("documents")) for s in stats["stages"]]  # noqa: E731
    assert counts(stats_two) == counts(stats_one)


def training_processes(netns: str) -> list[str]:
    """Pids of `python -m pretrain` ranks running in a node's network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    alive = []
    for pid in pids:
        try:
            if b"pretrain" in Path(f"/proc/{pid}/cmdline").read_bytes() and b"torch.distributed.run" not in \
                    Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
        except OSError:
            pass
    return alive


def lose_node(run: Run, how: str) -> float:
    """Take mn3 down while ``run`` trains past its step-20 checkpoint; seconds until the job left RUNNING."""
    wait_until(lambda: run.latest() == "step_00000020", 400, "the step-20 checkpoint", run)
    start = time.monotonic()
    if how == "kill":  # the node dies: every process in its namespace, slurmd and the job's ranks
        pids = subprocess.run(["ip", "netns", "pids", f"slurm-{VICTIM}"], capture_output=True,
                              text=True).stdout.split()
        subprocess.run(["kill", "-9", *pids], check=True)
    else:  # its network link is cut: the node and its processes live on, unreachable
        subprocess.run(["ip", "-n", "slurm-mnsw", "link", "set", f"p{VICTIM[2:]}", "down"], check=True)
    run.wait(lambda info: info.get("JobState") != "RUNNING", timeout=NODE_LOSS_BOUND_S + 60)
    return time.monotonic() - start


def node_loss_drill(multinode, runs_dir: Path, shards: Path, how: str) -> dict:
    """A 2-node run on mn1 + mn3 that loses mn3 after its step-20 checkpoint (``how``: killed, or its link
    cut), then gets it back; what the test asserts, measured on the way."""
    run = Run(multinode, runs_dir, f"node-loss-{how}", 2, 1,
              ["parallel=single", *BASE, f"parallel.timeout_s={COLLECTIVE_TIMEOUT_S}"], shards,
              where=(f"--nodelist=mn1,{VICTIM}",), drill=True)
    out: dict = {"run": run}
    lost_at = time.monotonic()
    try:
        out["ended_after"] = lose_node(run, how)
        lost_at = time.monotonic() - out["ended_after"]
        out["info"] = run.wait(lambda i: i.get("Restarts") == "1" or i.get("JobState") in TERMINAL - {"NODE_FAIL"},
                               timeout=120)
        if how == "cut-link" and out["info"].get("Restarts") == "1":
            # Cut off, mn3's rank waits in a collective nobody answers: parallel.timeout_s ends it, not the
            # wall-clock limit (Slurm cannot reach it to kill it). Seconds after the job left RUNNING, None if
            # it still runs after the bound.
            ended, deadline = time.monotonic(), time.monotonic() + COLLECTIVE_TIMEOUT_S + 45
            while training_processes(f"slurm-{VICTIM}") and time.monotonic() < deadline:
                time.sleep(1)
            out["rank_gone_after"] = None if training_processes(f"slurm-{VICTIM}") else time.monotonic() - ended
    finally:
        # The node comes back (up.sh restarts its slurmd and sets the link up again; ReturnToService=2).
        if how == "kill":
            time.sleep(max(0.0, NODE_DOWN_S - (time.monotonic() - lost_at)))
        multinode.up()
    if out["info"].get("Restarts") == "1":
        run.completed()
        out["node_state"] = node_state(multinode, VICTIM)  # back (before the next drill takes it down again)
    return out


@pytest.fixture(scope="session")
def node_loss(multinode, shards, runs_dir) -> dict:
    """The two node failure drills, one after the other in a background thread (mn3 runs nothing else, so they
    overlap the other tests); how -> the drill's measurements, or the exception that ended it."""
    results: dict = {}

    def drills() -> None:
        for how in ("kill", "cut-link"):
            try:
                results[how] = node_loss_drill(multinode, runs_dir, shards, how)
            except BaseException as exc:  # noqa: BLE001 - pytest.fail included: the test reports it
                results[how] = exc

    threading.Thread(target=drills, name="node-loss drills", daemon=True).start()
    return results


@pytest.mark.timeout(900)
@pytest.mark.parametrize("how", ["kill", "cut-link"])
def test_node_loss_ends_the_job_in_bounded_time_and_it_resumes(runs, node_loss, multinode, how):
    reference = runs["dp-2nodes"].completed()
    deadline = time.monotonic() + 850
    while how not in node_loss:
        assert time.monotonic() < deadline, f"the {how} drill did not end"
        time.sleep(1)
    if isinstance(node_loss[how], BaseException):
        raise node_loss[how]
    drill = node_loss[how]
    run = drill["run"]
    assert drill["info"].get("Restarts") == "1", drill["info"]
    assert drill["ended_after"] < NODE_LOSS_BOUND_S, drill["ended_after"]
    if how == "cut-link":
        assert drill["rank_gone_after"] is not None, "mn3's rank outlived parallel.timeout_s"
    starts = run.starts()
    assert [(r, s) for r, _, s in starts] == [(0, 0), (1, 20)], starts
    assert all(nodes == f"mn[1,{VICTIM[2:]}]" for _, nodes, _ in starts), starts
    # Nothing lost: steps 21.. were replayed from the step-20 checkpoint, bit for bit as uninterrupted.
    assert run.losses() == reference.losses()
    assert run.latest() == f"step_{STEPS:08d}"
    assert drill["node_state"] in {"idle", "mixed", "allocated", "completing"}
