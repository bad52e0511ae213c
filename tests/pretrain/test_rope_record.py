"""A checkpoint records its RoPE (rope.json); resuming or init_from with another base is a config error unless
model.rope_change_ok declares it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from pretrain import preflight
from pretrain.models.config import ModelConfig
from pretrain.models.rope_scaling import RopeScalingConfig
from pretrain.testing import write_learnable_shards

REPO = Path(__file__).resolve().parents[2]
QWEN2_TINY = dict(hidden_size=128, ffn_hidden_size=352, num_layers=4, num_heads=4, num_kv_heads=2)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope")
    data = write_learnable_shards(root / "shards", vocab_size=256, documents=32, doc_len=100)
    common = (f"data.paths=[{data}]", f"hydra.run.dir={root / 'run'}", "parallel=single", "trainer.wandb.mode=disabled",
              "trainer.eval_every=0", "data.seq_len=64", "trainer.plot_loss=false")
    proc = cli(*common, "trainer.steps=1", "model.rope_base=10000")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "run", common


def test_checkpoint_records_rope_and_a_silent_change_is_refused(run):
    run_dir, common = run
    ckpt = run_dir / "checkpoints" / "step_00000001"
    assert json.loads((ckpt / "rope.json").read_text()) == {"rope_base": 10000.0, "rope_scaling": {"type": "none"}}
    same = ModelConfig(**QWEN2_TINY, rope_base=10000.0)
    preflight.check_resume_shape(ckpt, same, 256)
    with pytest.raises(ConfigError, match=r"^model.rope_base=1e\+06 but this run's checkpoint step_00000001 was "
                                          r"trained with rope_base=10000: set model.rope_change_ok=true"):
        preflight.check_resume_shape(ckpt, ModelConfig(**QWEN2_TINY, rope_base=1e6), 256)
    yarn = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=64)
    with pytest.raises(ConfigError, match=r"^model.rope_scaling=.*'yarn'.* but model.init_from="):
        preflight.check_init_from(ModelConfig(**QWEN2_TINY, rope_base=10000.0, rope_scaling=yarn,
                                              init_from=str(ckpt)), vocab=256, tokenizer_vocab=256)
    preflight.check_init_from(ModelConfig(**QWEN2_TINY, rope_base=1e6, rope_change_ok=True, init_from=str(ckpt)),
                              vocab=256, tokenizer_vocab=256)

    proc = cli(*common, "trainer.steps=2")  # conf's rope_base is 1e6: not declared
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("config error:")]
    assert len(lines) == 1 and "model.rope_base=1e+06" in lines[0] and "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints" / "step_00000002").exists()
    proc = cli(*common, "trainer.steps=2", "model.rope_change_ok=true")  # declared: it resumes with the new base
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt2 = run_dir / "checkpoints" / "step_00000002"
    assert json.loads((ckpt2 / "rope.json").read_text())["rope_base"] == 1e6
