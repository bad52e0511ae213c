"""A staged recipe end to end on CPU (conf/recipe/tiny_long_context.yaml): 128 tokens at RoPE base 1e4, then 512
tokens at base 1e6 with context parallelism 2, the second stage starting from the first one's weights, and its
validation loss by position before and after the long stage."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.testing import write_learnable_shards

REPO = Path(__file__).resolve().parents[2]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return env


def _cmd(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", "recipe=tiny_long_context", f"recipe.run_dir={run_dir}",
            f"data.paths=[{data}]", "trainer.steps=6", "trainer.eval_every=6", "trainer.eval_steps=1",
            "trainer.wandb.mode=disabled", "trainer.plot_loss=false",
            "parallel=tp2", *extra]  # parallel=tp2 is overridden by each stage's own layout


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> dict:
    """The uninterrupted recipe, shared by the tests below."""
    root = tmp_path_factory.mktemp("recipe")
    data = write_learnable_shards(root / "shards", vocab_size=256, documents=64, doc_len=300)
    run_dir = root / "recipe"
    cmd = _cmd(data, run_dir)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    return {"data": data, "run_dir": run_dir, "cmd": cmd, "proc": proc}


def test_tiny_long_context_recipe_runs_both_stages_and_carries_the_weights(recipe):
    run_dir, cmd, proc, env = recipe["run_dir"], recipe["cmd"], recipe["proc"], _env()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    short, long = run_dir / "short_128", run_dir / "long_512"
    assert (short / "STAGE_DONE").is_file() and (long / "STAGE_DONE").is_file()
    rope = json.loads((long / "checkpoints" / "step_00000006" / "rope.json").read_text())
    assert rope["rope_base"] == 1e6
    assert json.loads((short / "checkpoints" / "step_00000006" / "rope.json").read_text())["rope_base"] == 1e4
    resolved = (long / "resolved_config.yaml").read_text()
    assert "cp: 2" in resolved and "seq_len: 512" in resolved and str(short / "checkpoints") in resolved
    first = [r for r in _rows(short / "metrics.jsonl") if "loss" in r]
    second = [r for r in _rows(long / "metrics.jsonl") if "loss" in r]  # not the step-0 evaluation row
    # Stage 2 starts from stage 1's trained weights, not from scratch: its first loss is already below the
    # initial ~ln(256) = 5.55 that stage 1 started at (measured: 5.56 -> 5.33 after 6 warmup steps).
    assert second[0]["loss"] < first[0]["loss"] - 0.15, (first[0]["loss"], second[0]["loss"])
    # Did the long stage work: the long stage evaluated its starting weights (stage 1's, at 512 tokens and the new
    # RoPE base) as step 0 and again after its last step, by position in 4 buckets of 128. Positions 384-512, which
    # stage 1 never trained on, get better across it (measured: 5.13 -> 4.75).
    evals = [r for r in _rows(long / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 6] and "loss" not in evals[0]
    buckets = [k for k in evals[0] if k.startswith("eval/loss_pos_")]
    assert buckets == [f"eval/loss_pos_{s}_{s + 128}" for s in (0, 128, 256, 384)]
    before, after = evals[0]["eval/loss_pos_384_512"], evals[1]["eval/loss_pos_384_512"]
    assert after < before - 0.1, (before, after)
    assert "eval      0/6" in proc.stderr + proc.stdout and "by position 0:" in proc.stderr + proc.stdout
    # Running the recipe again finds both stages done and starts nothing.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("already done") == 2, again.stdout + again.stderr[-2000:]


def test_a_recipe_interrupted_mid_stage_resumes_with_the_same_losses(recipe, tmp_path):
    """SIGKILL the recipe in its long stage after step 3 (checkpoint at step 2), run the same command again:
    stage 1 is skipped, stage 2 resumes from its own checkpoint, and its losses equal the uninterrupted run's."""
    from test_checkpoint import _process_tree, _signal

    run_dir = tmp_path / "recipe"
    cmd = _cmd(recipe["data"], run_dir, "trainer.save_every=2")
    # Stage 1 as the uninterrupted run finished it (its weights do not depend on save_every): the recipe goes
    # straight to the long stage, which starts from these weights as the uninterrupted one did.
    shutil.copytree(recipe["run_dir"] / "short_128", run_dir / "short_128")
    metrics = run_dir / "long_512" / "metrics.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    tree, deadline = [], time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            tree = _process_tree(proc.pid)
            _signal(tree, signal.SIGSTOP)  # frozen while read: killed in the state that was read
            if metrics.exists() and any(r.get("step") == 3 and "loss" in r for r in _rows(metrics)):
                break
            _signal(tree, signal.SIGCONT)
            time.sleep(0.05)
        assert proc.poll() is None, "the recipe ended before its long stage reached step 3"
    finally:
        _signal(tree + _process_tree(proc.pid), signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "long_512" / "STAGE_DONE").exists()
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert again.stdout.count("already done") == 1, again.stdout[-2000:]  # stage 1 only
    resumed = {r["step"]: r["loss"] for r in _rows(metrics) if "loss" in r}
    straight = {r["step"]: r["loss"] for r in _rows(recipe["run_dir"] / "long_512" / "metrics.jsonl") if "loss" in r}
    assert sorted(resumed) == list(range(1, 7))  # one clean history: the replayed steps are not doubled
    assert resumed == straight  # bit-identical, as for plain runs
