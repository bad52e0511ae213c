"""Bad input to training is one line naming the cause, before any process group starts (pretrain/preflight.py).

In-process tests of each check, then a few CLI runs that prove the line, the exit status 2, and that nothing
was started or written: each `python -m pretrain` run costs ~5-20 s, so they are few.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError, DataError
from pretrain import preflight
from pretrain.config import DataConfig
from pretrain.models.config import ModelConfig
from pretrain.testing import write_learnable_shards

REPO = Path(__file__).resolve().parents[2]
TINY = dict(hidden_size=64, ffn_hidden_size=176, num_layers=2, num_heads=4, num_kv_heads=2)  # ModelConfig defaults


def cli(*args: str, module: str = "pretrain", env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    """The single `<prefix> error: ...` line of a refused run (exit status 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{prefix} error:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-4000:]
    return lines[0]


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_learnable_shards(tmp_path / "shards", vocab_size=256, documents=16, doc_len=50)


def _manifest(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------------
# Token shards
# --------------------------------------------------------------------------------------------------
def test_intact_shards_pass(shards):
    preflight.check_shards(DataConfig(paths=[str(shards)]))


def _truncate_bin(shards: Path) -> str:
    f = shards / "shard_00000.bin"
    os.truncate(f, f.stat().st_size - 4)
    return "shard_00000.bin has 3260 bytes, expected 3264 (816 int32 tokens): truncated"


def _bad_magic(shards: Path) -> str:
    f = shards / "shard_00000.idx"
    f.write_bytes(b"NOTANIDX\x00" + f.read_bytes()[9:])
    return "shard_00000.idx is not a megatron .idx file"


def _bad_dtype_code(shards: Path) -> str:
    f = shards / "shard_00000.idx"
    raw = bytearray(f.read_bytes())
    raw[17] = 42  # the dtype code after magic (9 bytes) and version (8 bytes)
    f.write_bytes(bytes(raw))
    return "shard_00000.idx: corrupt header (version 1, dtype code 42"


def _bad_counts(shards: Path) -> str:
    f = shards / "shard_00000.idx"
    raw = bytearray(f.read_bytes())
    raw[18:26] = (1000).to_bytes(8, "little")  # the sequence count
    f.write_bytes(bytes(raw))
    return "shard_00000.idx: header counts 1000 documents but its manifest says 16"


def _truncated_idx(shards: Path) -> str:
    f = shards / "shard_00000.idx"
    os.truncate(f, f.stat().st_size - 8)
    return "shard_00000.idx has 354 bytes, its header promises 362"


def _small_vocab(shards: Path) -> str:
    manifest = _manifest(shards)
    manifest["vocab_size"], manifest["eod_id"] = 200, 199
    (shards / "manifest.json").write_text(json.dumps(manifest))
    ids = np.fromfile(shards / "shard_00000.bin", dtype=np.int32)
    return f"shard_00000.bin holds token id {ids.max()}, but its manifest says vocab_size=200"


def _missing_bin(shards: Path) -> str:
    (shards / "shard_00000.bin").unlink()
    return "shard_00000.bin is missing"


def _manifest_tokens(shards: Path) -> str:
    manifest = _manifest(shards)
    manifest["shards"][0]["tokens"] += 1
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return "shard_00000.idx indexes 816 tokens but its manifest says 817"


@pytest.mark.parametrize("damage", [_truncate_bin, _bad_magic, _bad_dtype_code, _bad_counts, _truncated_idx,
                                    _small_vocab, _missing_bin, _manifest_tokens], ids=lambda f: f.__name__[1:])
def test_damaged_shards_are_one_data_error(shards, damage):
    expected = damage(shards)
    with pytest.raises(DataError) as err:
        preflight.check_shards(DataConfig(paths=[str(shards)]))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_token_scan_runs_once_per_shard_version(shards, monkeypatch):
    """The launcher's check scans every token; the ranks' checks (and later runs) read the answer from
    token_scan.json while the .bin keeps its size, mtime and inode, and scan again once it changes."""
    import common.shards

    scans = []
    scan = common.shards.max_token_id
    monkeypatch.setattr(common.shards, "max_token_id", lambda *a: scans.append(a[0].name) or scan(*a))
    data = DataConfig(paths=[str(shards)])
    preflight.check_shards(data)
    assert scans == ["shard_00000.bin"] and (shards / "token_scan.json").is_file()
    # The cached largest id is compared with the manifest of the day: a smaller vocab_size needs no new scan.
    manifest = _manifest(shards)
    expected = _small_vocab(shards)
    with pytest.raises(DataError, match=re.escape(expected)):
        preflight.check_shards(data)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    # An id past the vocabulary written in place, size and mtime kept: the cached answer is used (no scan).
    f = shards / "shard_00000.bin"
    st = f.stat()
    with f.open("r+b") as out:
        out.write(np.array([9999], dtype=np.int32).tobytes())
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    preflight.check_shards(data)
    assert scans == ["shard_00000.bin"]
    # A shard that changed (here its mtime) is scanned again, and the bad id is found.
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(DataError, match="shard_00000.bin holds token id 9999, but its manifest says vocab_size=256"):
        preflight.check_shards(data)
    assert scans == ["shard_00000.bin"] * 2


def test_damaged_token_scan_cache_means_a_new_scan(shards):
    data = DataConfig(paths=[str(shards)])
    preflight.check_shards(data)
    (shards / "token_scan.json").write_text("{damaged")
    preflight.check_shards(data)
    assert json.loads((shards / "token_scan.json").read_text())["shards"]["shard_00000"]["max_id"] == 255  # the EOD id


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------
def test_vocab_smaller_than_tokenizer_and_padding_note():
    with pytest.raises(ConfigError, match="model.vocab_size=128 is smaller than the tokenizer's 256 tokens"):
        preflight.check_vocab(ModelConfig(vocab_size=128), 256, tp=2)
    with pytest.raises(ConfigError, match="model.vocab_size=301 is not divisible by parallel.tp=2"):
        preflight.check_vocab(ModelConfig(vocab_size=301), 300, tp=2)
    assert preflight.check_vocab(ModelConfig(), 300, tp=2) == 512
    note = preflight.vocab_padding_note(ModelConfig(), 300, tp=2)
    assert note.startswith("vocabulary padded from the tokenizer's 300 tokens to 512 embedding rows (a multiple of "
                           "model.pad_vocab_multiple × parallel.tp = 128 × 2"), note
    assert "the 212 extra rows" in note
    assert preflight.vocab_padding_note(ModelConfig(), 256, tp=2) is None  # nothing padded, nothing said


# --------------------------------------------------------------------------------------------------
# model.init_from (Hugging Face dirs) and torch_dist checkpoints (init_from, resume)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("hf") / "tiny"
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def _init_from(path, **fields) -> ModelConfig:
    return ModelConfig(**{**TINY, **fields}, init_from=str(path))


def test_init_from_hf_checks(hf_dir, tmp_path):
    preflight.check_init_from(_init_from(hf_dir), vocab=256, tokenizer_vocab=256)  # fits: no error
    with pytest.raises(ConfigError, match=re.escape(f"model.init_from={tmp_path}/nope does not exist")):
        preflight.check_init_from(_init_from(tmp_path / "nope"), vocab=256, tokenizer_vocab=256)
    with pytest.raises(ConfigError, match="does not fit model 'qwen2_tiny': hidden_size: checkpoint 64 vs model 128"):
        preflight.check_init_from(_init_from(hf_dir, hidden_size=128, ffn_hidden_size=176), vocab=256,
                                  tokenizer_vocab=256)
    with pytest.raises(ConfigError, match="the tokenizer of data.paths has 300 tokens but the checkpoint's embedding "
                                          "only 256 rows"):
        preflight.check_init_from(_init_from(hf_dir), vocab=384, tokenizer_vocab=300)
    truncated = tmp_path / "truncated"
    shutil.copytree(hf_dir, truncated)
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ConfigError, match="model.safetensors is not a readable safetensors file .truncated or corrupt"):
        preflight.check_init_from(_init_from(truncated), vocab=256, tokenizer_vocab=256)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-step run of the tiny model (parallel=single): its data and run directory, with one checkpoint."""
    root = tmp_path_factory.mktemp("run")
    data = write_learnable_shards(root / "shards", vocab_size=256, documents=32, doc_len=100)
    run = root / "run"
    proc = cli(f"data.paths=[{data}]", f"hydra.run.dir={run}", "parallel=single", "trainer.steps=1",
               "trainer.wandb.mode=disabled", "trainer.eval_every=0", "data.seq_len=64", "trainer.plot_loss=false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return data, run


def test_checkpoint_of_another_shape_names_the_field(trained_run, tmp_path):
    _, run = trained_run
    ckpt = run / "checkpoints" / "step_00000001"
    model = ModelConfig(**{**TINY, "hidden_size": 128, "num_layers": 4, "ffn_hidden_size": 352})  # conf/'s qwen2_tiny
    preflight.check_resume_shape(ckpt, model, 256)  # the shape it was saved with: no error
    with pytest.raises(ConfigError) as err:
        preflight.check_resume_shape(ckpt, ModelConfig(**{**TINY, "hidden_size": 128, "ffn_hidden_size": 352}), 512)
    assert str(err.value) == (
        f"this run's checkpoint {ckpt} holds a model of another shape: model.num_layers=2 (checkpoint: 4); the "
        "vocabulary has 512 rows (checkpoint: 256; model.vocab_size=256 matches it). Resume with the model settings "
        "it was saved with, or start a new run (another trainer.run_name).")
    with pytest.raises(ConfigError, match=r"model.num_heads=8 with model.num_kv_heads=8 give 384 query/key/value rows "
                                          r"\(checkpoint: 256\)"):
        preflight.check_resume_shape(ckpt, ModelConfig(**{**TINY, "hidden_size": 128, "num_layers": 4,
                                                          "ffn_hidden_size": 352, "num_heads": 8, "num_kv_heads": 8}), 256)
    # The same check guards model.init_from=<torch_dist checkpoint>, and a truncated .distcp file is found too.
    with pytest.raises(ConfigError, match=r"model.init_from=.*: .* holds a model of another shape: model.hidden_size=64 "
                                          r"\(checkpoint: 128\)"):
        preflight.check_init_from(_init_from(ckpt), vocab=256, tokenizer_vocab=256)
    copy = tmp_path / "step_00000001"
    shutil.copytree(ckpt, copy)
    distcp = sorted(copy.glob("*.distcp"))[0]
    os.truncate(distcp, distcp.stat().st_size - 1)
    with pytest.raises(ConfigError, match=f"{distcp.name} has .* bytes, its metadata needs .* .truncated."):
        preflight.check_init_from(_init_from(copy, **model_fields(model)), vocab=256, tokenizer_vocab=256)


def model_fields(model: ModelConfig) -> dict:
    return {k: getattr(model, k) for k in TINY}


# --------------------------------------------------------------------------------------------------
# The CLI: one line, exit 2, nothing started or written
# --------------------------------------------------------------------------------------------------
def test_cli_resume_with_another_shape_is_refused_before_launch(trained_run):
    data, run = trained_run
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    resolved = (run / "resolved_config.yaml").read_text()
    proc = cli(f"data.paths=[{data}]", f"hydra.run.dir={run}", "model.hidden_size=64", "trainer.steps=2",
               "trainer.wandb.mode=disabled", "trainer.eval_every=0", "data.seq_len=64")  # default layout: tp2
    line = one_error_line(proc, "config")
    assert "holds a model of another shape: model.hidden_size=64 (checkpoint: 128)" in line
    assert "starting 2 local processes" not in proc.stdout + proc.stderr  # refused before torchrun
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert (run / "resolved_config.yaml").read_text() == resolved


@pytest.mark.parametrize("case", ["truncated_bin", "vocab_below_tokenizer", "corrupt_idx_single"])
def test_cli_bad_data_or_vocab_is_one_line_before_launch(tmp_path, case):
    data = write_learnable_shards(tmp_path / "shards", vocab_size=256, documents=16, doc_len=50)
    overrides = []
    if case == "truncated_bin":
        expected, prefix = _truncate_bin(data), "data"
    elif case == "vocab_below_tokenizer":
        expected, prefix = "model.vocab_size=128 is smaller than the tokenizer's 256 tokens", "config"
        overrides = ["model.vocab_size=128"]
    else:  # one process: the per-rank path (run) refuses before init_distributed
        expected, prefix = _bad_magic(data), "data"
        overrides = ["parallel=single"]
    run = tmp_path / "run"
    proc = cli(f"data.paths=[{data}]", f"hydra.run.dir={run}", "trainer.wandb.mode=disabled", *overrides)
    assert expected in one_error_line(proc, prefix)
    assert "starting 2 local processes" not in proc.stdout + proc.stderr
    assert not (run / "checkpoints").exists() and not (run / "resolved_config.yaml").exists()


def test_cli_launch_checks_once_and_logs_the_planner_once(tmp_path):
    """Two local processes: the launcher scans the tokens and plans; rank 0 reads the scan from token_scan.json
    (no second 'token scan' line) and is the one place the planner's prediction is logged."""
    data = write_learnable_shards(tmp_path / "shards", vocab_size=256, documents=32, doc_len=100)
    proc = cli(f"data.paths=[{data}]", f"hydra.run.dir={tmp_path / 'run'}", "trainer.steps=1", "data.seq_len=64",
               "trainer.wandb.mode=disabled", "trainer.eval_every=0", "trainer.plot_loss=false")  # default: tp2
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "starting 2 local processes" in out
    assert out.count("token scan: 1 shard(s)") == 1, out[-4000:]
    assert out.count("planner: model states per rank") == 1, out[-4000:]


# `+key=` composes (Hydra's own advice for an unknown key) and is refused when the typed config is built.
@pytest.mark.parametrize("module, override, expected", [
    ("pretrain", "trainer.foo=1", "config error: Could not override 'trainer.foo'; Key 'foo' not in 'TrainerConfig'"),
    ("pretrain", "+trainer.foo=1", "config error: trainer.foo is not a setting: TrainerConfig has no field 'foo'"),
    ("pretrain", "trainer.steps=abc", "config error: Error merging override trainer.steps=abc; Value 'abc' of type "
                                      "'str' could not be converted to Integer"),
    ("pretrain", "model=nope", "config error: In 'config': Could not find 'model/nope'; Available options in 'model': "
                               "qwen1_5_moe_a2_7b, qwen2_0_5b,"),
    ("data_pipeline", "data_pipeline.foo=1", "config error: Could not override 'data_pipeline.foo'; Key 'foo' not in"),
    ("data_pipeline", "+data_pipeline.tokenizer.bar=1", "config error: data_pipeline.tokenizer.bar is not a setting"),
])
def test_hydra_errors_are_one_config_error_line(tmp_path, module, override, expected):
    proc = cli(override, f"hydra.run.dir={tmp_path / 'run'}", module=module)
    assert one_error_line(proc, "config").startswith(expected)
    assert not (tmp_path / "run" / "checkpoints").exists()
