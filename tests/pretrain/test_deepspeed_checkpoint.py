"""DeepSpeed ZeRO-2/3 runs checkpoint like megatron-core ones: kill -9 and resume bit-identically, fall back
past a damaged checkpoint, refuse layouts DeepSpeed cannot load, and export to Hugging Face.

DeepSpeed start-up is slow (a CLI launch is ~3 interpreters importing torch, megatron-core and DeepSpeed),
so each ZeRO stage runs once straight in-process (``run_distributed`` ranks calling the same ``run()`` a
torchrun rank executes) and once through the CLI, SIGKILLed and resumed (ZeRO-2 through the CLI, ZeRO-3
in-process); every assertion reads those runs. Losses are compared for exact equality: a resume does not
change DeepSpeed's reduction order, and bit-identical is what was measured.
"""
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DS_BUILD_OPS=0 pip install deepspeed==0.19.8")

from common.errors import ConfigError  # noqa: E402
from parallel.testing import run_distributed  # noqa: E402
from pretrain.checkpoint import Checkpointer, check_resumable, verify  # noqa: E402
from pretrain.testing import write_learnable_shards  # noqa: E402
from test_checkpoint import COMMON, kill_at_step, losses, run  # noqa: E402

ARGS = ("trainer.steps=8", "trainer.save_every=2", "trainer.keep_last=3")


def _job(shards: Path, *overrides: str):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from pretrain.config import register_configs

    register_configs()
    with initialize_config_module(config_module="conf", version_base=None):
        cfg = compose(config_name="config", overrides=[f"data.paths=[{shards}]", *COMMON, *overrides])
    return OmegaConf.to_object(cfg)


def _train(rank: int, world_size: int, job, run_dir: str) -> None:
    from pretrain.__main__ import run as run_job

    run_job(job, Path(run_dir))


def straight_and_killed(tmp_path: Path, shards: Path, *args: str) -> tuple[dict[int, float], Path]:
    """The uninterrupted run's losses, and a CLI run SIGKILLed right after step 5 (checkpoints 2 and 4)."""
    run_distributed(_train, 2, _job(shards, *args), str(tmp_path / "straight"), timeout=400)
    killed = tmp_path / "killed"
    kill_at_step(killed, shards, 5, *args)
    return losses(tmp_path / "straight"), killed


def rows(run_dir: Path) -> dict[int, dict]:
    """Per step, what the trainer state and schedule decide (the last write of a step wins)."""
    keys = ("loss", "lr", "grad_norm", "skipped_steps", "tokens_seen")
    lines = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: {k: r[k] for k in keys} for r in lines}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_learnable_shards(tmp_path_factory.mktemp("shards"), vocab_size=256)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, shards) -> dict:
    """ZeRO-3: killed after step 5, its newest checkpoint (step 4) truncated, then resumed by the ranks'
    own ``run()`` (in-process: the CLI path is the ZeRO-2 test's)."""
    reference, killed = straight_and_killed(tmp_path_factory.mktemp("zero3"), shards, "parallel=zero3", *ARGS)
    ckpts = killed / "checkpoints"
    out = {"reference": reference, "run_dir": killed, "job": _job(shards, "parallel=zero3", *ARGS),
           "newest": Checkpointer(ckpts, 3).latest().name}
    # Rank 1's optimizer partition: rank 0 alone verifies, so it must check every rank's files.
    victim = ckpts / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out["damage"] = verify(ckpts / "step_00000004")
    out["fallback"] = Checkpointer(ckpts, 3).latest().name  # a fresh process (a restart) sees the damage
    run_distributed(_train, 2, out["job"], str(killed), timeout=400)
    return out


@pytest.mark.timeout(900)
def test_zero2_resume_after_kill9_is_bit_identical_and_other_layouts_are_refused(tmp_path, shards):
    args = ("parallel=zero2", *ARGS, "trainer.inject_nan_steps=[3]")  # a skipped step before the kill
    straight_and_killed(tmp_path, shards, *args)
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    newest = Checkpointer(ckpts, 3).latest()
    assert newest.name == "step_00000004"
    assert (newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # DeepSpeed's own files

    # DeepSpeed loads ZeRO partitions only at the dp size and stage that wrote them: refused before any
    # process starts, naming both sizes; the checkpoint is left as it is.
    proc = run(killed, shards, *args, "parallel.dp=4", "trainer.micro_batch_size=2", expect_rc=2)
    assert "config error: parallel.zero=2 with parallel.dp=4 cannot resume" in proc.stderr
    assert "DeepSpeed ZeRO-2 saved it at dp=2" in proc.stderr and "Traceback" not in proc.stderr
    for zero, dp, message in ((3, 2, "parallel.zero=3 with parallel.dp=2 cannot resume"),
                              (None, 1, "a megatron-core run (parallel.zero=0/1) with parallel.dp=1 cannot resume")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_resumable(newest, zero=zero, dp=dp)

    run(killed, shards, *args)
    resumed, reference = rows(killed), rows(tmp_path / "straight")
    assert sorted(resumed) == list(range(1, 9)) and reference[3]["skipped_steps"] == 1
    # Bit-identical losses and norms; the skipped-step count, tokens seen and LR carried over.
    assert [resumed[s] for s in range(5, 9)] == [reference[s] for s in range(5, 9)]
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "latest", "step_00000004", "step_00000006", "step_00000008", "zero_to_fp32.py", "zero_to_torch.py"]
    assert (ckpts / "latest").read_text() == "step_00000008" and verify(ckpts / "step_00000008") is None


@pytest.mark.timeout(900)
def test_zero3_falls_back_past_a_truncated_checkpoint_and_resumes_bit_identical(zero3):
    assert zero3["newest"] == "step_00000004"
    assert zero3["damage"].startswith("zero_pp_rank_1_mp_rank_00_optim_states.pt has")
    assert zero3["fallback"] == "step_00000002"
    # The killed run logged steps 1-5; the resumed one dropped 3-5 and redid them from the step-2 checkpoint.
    rows = (zero3["run_dir"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    resumed, reference = losses(zero3["run_dir"]), zero3["reference"]
    assert [resumed[s] for s in range(3, 9)] == [reference[s] for s in range(3, 9)]  # bit-identical
    ckpts = zero3["run_dir"] / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000008" and verify(ckpts / "step_00000004") is None


def _trainer_view(rank: int, world_size: int, job, ckpt: str, run_dir: str) -> dict:
    """Step 7's global batch, and the logits on it of the trainer's own model (megatron-core, one process)
    started from the DeepSpeed checkpoint through ``model.init_from``."""
    import dataclasses

    from parallel.config import ParallelConfig
    from parallel.mesh import init_distributed
    from pretrain.data import Shards, build_datasets, microbatches
    from pretrain.convert import init_chunks_from
    from pretrain.models.decoder.model import build_model_chunks, padded_vocab_size, transformer_config

    init_distributed(ParallelConfig(), seed=0)
    shards = Shards.from_config(job.data)
    t = job.trainer
    train, _ = build_datasets(job.data, shards, seed=t.seed, train_samples=t.steps * t.global_batch_size,
                              valid_samples=0, cache_dir=str(Path(run_dir) / "data_cache"))
    (batch,) = next(microbatches(train, global_batch_size=t.global_batch_size, micro_batch_size=t.global_batch_size,
                                 dp_rank=0, dp_size=1, start_step=6))
    model = dataclasses.replace(job.model, init_from=ckpt)
    (chunk,) = build_model_chunks(model, transformer_config(model), padded_vocab_size(model, shards.vocab_size, 1))
    init_chunks_from([chunk], model, ckpt)
    chunk.eval()
    with torch.no_grad():
        logits = chunk(batch["tokens"], batch["position_ids"], None)
    return {**batch, "logits": logits}


def _mean_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), reduction="none")
    return float((per_token * mask.flatten()).sum() / mask.sum())


@pytest.mark.timeout(600)
def test_zero3_checkpoint_exports_to_hf_with_the_trainers_logits(zero3, tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrain.convert import main

    ckpt = zero3["run_dir"] / "checkpoints" / "step_00000006"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    (ours,) = run_distributed(_trainer_view, 1, zero3["job"], str(ckpt), str(zero3["run_dir"]), timeout=300)
    with torch.no_grad():
        hf_logits = hf(input_ids=ours["tokens"], position_ids=ours["position_ids"]).logits
    assert float((hf_logits - ours["logits"]).abs().max()) <= 1e-5  # measured: 0.0
    # Step 7's logged loss was computed by the DeepSpeed engine on exactly these weights.
    logged = losses(zero3["run_dir"])[7]
    assert abs(_mean_loss(ours["logits"], ours["labels"], ours["loss_mask"]) - logged) <= 1e-6  # measured: 1.5e-7
    assert abs(_mean_loss(hf_logits, ours["labels"], ours["loss_mask"]) - logged) <= 1e-5


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("unpickling ran code",))  # a harmless stand-in for os.system


def test_deepspeed_readers_unpickle_weights_only(tmp_path, capsys):
    import pickle

    from parallel.deepspeed import weights_only_loads

    real_load = torch.load
    tampered = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": _RunsCodeWhenUnpickled()}, tampered)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(tampered, map_location="cpu", weights_only=False)  # as DeepSpeed's readers call it
    assert "unpickling ran code" not in capsys.readouterr().out
    assert torch.load is real_load
