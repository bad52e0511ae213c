"""slurm/pretrain.sh across the simulated 2-node cluster (up.sh --nodes 2): every layout, checkpoint,
preemption and node loss gives the losses of the same run on one node.

One set of runs is submitted at once (``runs``) and shared by the tests; all use the same config
(``STEPS`` steps, so the same LR schedule) and their own run names. Losses come from each run's
metrics.jsonl; a step logged twice (replayed after a crash) counts with its last value. The node
failure tests come last: they take node 2 down and wait for the cluster to be idle first.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
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
    def __init__(self, slurm, runs_dir: Path, name: str, nodes: int, nproc: int, overrides: list[str],
                 data: Path) -> None:
        self.slurm, self.dir, self.name = slurm, runs_dir / name, name
        self.job = slurm.submit("--time=15", f"--nodes={nodes}", "slurm/pretrain.sh", "--nproc-per-node", str(nproc),
                                *overrides, f"data.paths=[{data}]", f"trainer.run_name={name}",
                                env={"RUNS_DIR": str(runs_dir)})
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
    return tmp_path_factory.mktemp("multinode_runs")


@pytest.fixture(scope="session")
def runs(multinode, shards, runs_dir) -> dict[str, Run]:
    """All parity runs, submitted together (the cluster runs them side by side)."""
    return {name: Run(multinode, runs_dir, name, nodes, nproc, overrides, shards)
            for name, (nodes, nproc, overrides) in RUNS.items()}


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


def wait_idle(slurm, timeout: float = 400) -> None:
    """Until no job of this cluster is queued or running (the node failure tests disturb every job on mn2)."""
    deadline = time.monotonic() + timeout
    while slurm.run("squeue", "-h", "-o", "%A").stdout.strip():
        assert time.monotonic() < deadline, slurm.run("squeue").stdout
        time.sleep(1)


def node_state(slurm, node: str) -> str:
    return slurm.run("sinfo", "-h", "-N", "-n", node, "-o", "%T").stdout.strip()


@pytest.mark.timeout(120)
def test_nodes_have_their_own_names_and_addresses(multinode):
    start = time.monotonic()
    proc = subprocess.run([str(REPO / "slurm/cluster/up.sh"), "--nodes", "2"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 10 and "starting" not in proc.stdout, proc.stdout  # idempotent
    out = multinode.run("srun", "--nodes=2", "--ntasks-per-node=1", "--label", "sh", "-c",
                        'echo $(hostname) $(getent ahostsv4 $(hostname) | head -1 | cut -d" " -f1)').stdout
    assert sorted(out.split("\n")[:2]) == ["0: mn1 10.250.0.1", "1: mn2 10.250.0.2"], out


@pytest.mark.timeout(120)
def test_unreachable_head_node_fails_fast_with_one_line(multinode, shards, runs_dir):
    # An address of the cluster's private subnet that no node holds: nothing answers there.
    start = time.monotonic()
    job = multinode.submit("--time=5", "--nodes=2", "slurm/pretrain.sh", "--nproc-per-node", "1", "parallel=single",
                           f"data.paths=[{shards}]", "trainer.run_name=unreachable",
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
@pytest.mark.parametrize("source, nodes, nproc", [("dp-2nodes", 1, 2), ("dp-1node", 2, 1)])
def test_checkpoint_resumes_on_another_node_count(runs, multinode, shards, source, nodes, nproc):
    reference = runs[source].completed()
    name = f"{source}-resumed-on-{nodes}"
    resume_copy(reference, name, at_step=20)
    resumed = Run(multinode, reference.dir.parent, name, nodes, nproc, ["parallel=single", *BASE], shards).completed()
    assert resumed.starts()[0][2] == 20
    assert resumed.losses() == reference.losses()  # steps 21..40 equal the uninterrupted run's


@pytest.mark.timeout(600)
def test_preemption_across_nodes_saves_one_step_everywhere_and_resumes_identically(runs, multinode, shards):
    reference = runs["dp-2nodes"].completed()
    run = Run(multinode, reference.dir.parent, "preempted-2nodes", 2, 1, ["parallel=single", *BASE], shards)
    wait_until(lambda: len(run.losses()) >= 3, 300, "3 steps", run)
    multinode.run("scancel", "--signal=USR1", "--batch", run.job)
    run.completed()
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
    # 8 CPUs per task = a whole node: the 2 tasks of each stage run on different nodes.
    slurm_cfg = "SlurmConfig(partition='mn', time='00:10:00', cpus_per_task=8, mem_per_cpu_gb=1)"
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


def lose_node(run: Run, multinode, how: str) -> float:
    """Take mn2 down while ``run`` trains past its step-20 checkpoint; seconds until the job left RUNNING."""
    wait_until(lambda: run.latest() == "step_00000020", 400, "the step-20 checkpoint", run)
    start = time.monotonic()
    if how == "kill":  # the node dies: every process in its namespace, slurmd and the job's ranks
        pids = subprocess.run(["ip", "netns", "pids", "slurm-mn2"], capture_output=True, text=True).stdout.split()
        subprocess.run(["kill", "-9", *pids], check=True)
    else:  # its network link is cut: the node and its processes live on, unreachable
        subprocess.run(["ip", "-n", "slurm-mnsw", "link", "set", "p2", "down"], check=True)
    run.wait(lambda info: info.get("JobState") != "RUNNING", timeout=NODE_LOSS_BOUND_S + 60)
    return time.monotonic() - start


@pytest.mark.timeout(900)
@pytest.mark.parametrize("how", ["kill", "cut-link"])
def test_node_loss_ends_the_job_in_bounded_time_and_it_resumes(runs, multinode, shards, how):
    reference = runs["dp-2nodes"].completed()
    wait_idle(multinode)
    run = Run(multinode, reference.dir.parent, f"node-loss-{how}", 2, 1,
              ["parallel=single", *BASE, f"parallel.timeout_s={COLLECTIVE_TIMEOUT_S}"], shards)
    lost_at = time.monotonic()
    try:
        ended_after = lose_node(run, multinode, how)
        lost_at = time.monotonic() - ended_after
        info = run.wait(lambda i: i.get("Restarts") == "1" or i.get("JobState") in TERMINAL - {"NODE_FAIL"},
                        timeout=120)
        assert info.get("Restarts") == "1", info
        assert ended_after < NODE_LOSS_BOUND_S, ended_after
        if how == "cut-link":
            # Cut off, mn2's rank waits in a collective nobody answers: parallel.timeout_s ends it, not the
            # wall-clock limit (Slurm cannot reach it to kill it).
            deadline = time.monotonic() + COLLECTIVE_TIMEOUT_S + 45
            while training_processes("slurm-mn2"):
                assert time.monotonic() < deadline, "mn2's rank outlived parallel.timeout_s"
                time.sleep(1)
    finally:
        # The node comes back (up.sh restarts its slurmd and sets the link up again; ReturnToService=2).
        if how == "kill":
            time.sleep(max(0.0, NODE_DOWN_S - (time.monotonic() - lost_at)))
        subprocess.run([str(REPO / "slurm/cluster/up.sh"), "--nodes", "2"], capture_output=True, timeout=120)
    run.completed()
    starts = run.starts()
    assert [(r, s) for r, _, s in starts] == [(0, 0), (1, 20)], starts
    # Nothing lost: steps 21.. were replayed from the step-20 checkpoint, bit for bit as uninterrupted.
    assert run.losses() == reference.losses()
    assert run.latest() == f"step_{STEPS:08d}"
    assert node_state(multinode, "mn2") in {"idle", "mixed", "allocated", "completing"}
