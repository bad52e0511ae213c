"""`python -m pretrain.plan`: ranked output, JSON fields, errors; the pre-launch check."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.errors import ConfigError


def _plan(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.plan", *overrides], capture_output=True, text=True,
                          timeout=300)


def test_json_plan_is_ranked_and_complete():
    out = _plan("model=qwen2_7b", "plan.gpus=8", "plan.format=json", "plan.top=5", "plan.show_infeasible=3",
                "trainer.global_batch_size=64")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    feasible = [r for r in rows if r["feasible"]]
    assert len(feasible) == 5 and len(rows) == 8
    speeds = [r["tokens_per_s_per_gpu"] for r in feasible]
    assert speeds == sorted(speeds, reverse=True)
    for r in feasible:
        mem, t = r["memory_gib"], r["time_s"]
        parts = ("weights", "gradients", "optimizer_state", "activations", "logits_loss", "comm_buffers", "reserved")
        assert mem["total"] == pytest.approx(sum(mem[k] for k in parts)) and mem["total"] <= 80e9 / 2**30
        assert t["total"] == pytest.approx(sum(t[k] for k in ("compute", "tp_comm", "cp_comm", "ep_comm",
                                                                "pp_bubble", "dp_comm")))
        lay = r["layout"]
        assert lay["tp"] * lay["pp"] * lay["cp"] * lay["dp"] == 8
        # tokens/s per GPU is the global batch's tokens over the step time and the GPU count
        assert r["tokens_per_s_per_gpu"] == pytest.approx(64 * 4096 / t["total"] / 8)
    assert all(r["reason"] for r in rows if not r["feasible"])


def test_table_and_bad_gpu():
    out = _plan("model=qwen2_72b", "plan.gpus=64", "plan.top=3", "trainer.global_batch_size=512")
    assert out.returncode == 0, out.stderr
    assert "qwen2_72b on 64 x H100 SXM 80GB" in out.stdout and "| 1 |" in out.stdout
    bad = _plan("plan.gpu=v100")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("config error: plan.gpu='v100'")


def test_prelaunch_check_names_largest_term_and_a_layout_that_fits():
    from parallel.config import ParallelConfig
    from parallel.layout import ParallelLayout
    from pretrain.config import DataConfig, JobConfig, TrainerConfig
    from pretrain.models.config import ModelConfig
    from pretrain.plan.check import check_before_launch
    from pretrain.plan.hardware import GPUS

    model = ModelConfig(name="qwen2_7b", hidden_size=3584, ffn_hidden_size=18944, num_layers=28, num_heads=28,
                        num_kv_heads=4, vocab_size=152064, max_seq_len=32768)
    job = JobConfig(model=model, data=DataConfig(seq_len=4096), parallel=ParallelConfig(zero=0),
                    trainer=TrainerConfig(micro_batch_size=2, global_batch_size=64, precision="bf16"))
    with pytest.raises(ConfigError, match=r"predicted not to fit a H100 SXM 80GB: needs .* \(largest: "
                                          r"(gradients|activations|optimizer_state).*a layout that fits: tp"):
        check_before_launch(job, ParallelLayout.resolve(job.parallel, world_size=8), None, gpu=GPUS["h100_80gb"])
    check_before_launch(job, ParallelLayout.resolve(job.parallel, world_size=8), None, gpu=None)  # CPU: logs only
