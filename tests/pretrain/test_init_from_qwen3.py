"""``model.init_from=<Qwen3 HF dir>`` continues training: the trainer's first-step loss (the real ``run()`` a
torchrun rank executes, logged to metrics.jsonl) equals transformers' own ``Qwen3ForCausalLM`` /
``Qwen3MoeForCausalLM`` loss on the same global batch, rebuilt here from the same shards, within 1e-5 (fp32).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parallel.testing import run_distributed
from pretrain.testing import write_learnable_shards

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ, GBS, MBS = 256, 32, 4, 2


def _train(rank: int, world_size: int, job, run_dir: str) -> None:
    from pretrain.__main__ import run as run_job

    run_job(job, Path(run_dir))


def _job(shards: Path, hf_dir: Path):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from pretrain.config import register_configs
    from pretrain.models.hf import HFCheckpoint, model_config_from_hf

    register_configs()
    overrides = [f"data.paths=[{shards}]", "trainer.wandb.mode=disabled", "trainer.log_every=1",
                 f"data.seq_len={SEQ}", "trainer.steps=1", f"trainer.global_batch_size={GBS}",
                 f"trainer.micro_batch_size={MBS}", "trainer.eval_every=0", "trainer.plot_loss=false",
                 "parallel=single"]
    with initialize_config_module(config_module="conf", version_base=None):
        job = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    job.model = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dir).config, name="tiny"),
                                    init_from=str(hf_dir))
    return job


def _first_global_batch(job, cache_dir: Path) -> list[dict]:
    """The microbatches of step 1, as build_trainer feeds them (same datasets, seed and sample order)."""
    from pretrain.data import Shards, build_datasets, microbatches

    t = job.trainer
    train, _ = build_datasets(job.data, Shards.from_config(job.data), seed=t.seed, train_samples=t.steps * GBS,
                              valid_samples=0, cache_dir=str(cache_dir))
    return next(microbatches(train, global_batch_size=GBS, micro_batch_size=MBS, dp_rank=0, dp_size=1, start_step=0))


def _transformers_loss(hf_dir: Path, batch: list[dict]) -> float:
    """Mean next-token cross-entropy over the loss-masked tokens of the whole batch, by transformers' model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for mb in batch:
            logits = model(mb["tokens"], position_ids=mb["position_ids"]).logits.double()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb["labels"].reshape(-1), reduction="none")
            mask = mb["loss_mask"].reshape(-1).double()
            total += float((ce * mask).sum())
            count += float(mask.sum())
    return total / count


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_first_step_loss_equals_transformers(kind, tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "models"))
    from qwen2_tiny_hf import build_tiny_hf

    shards = write_learnable_shards(tmp_path / "shards", vocab_size=VOCAB)
    hf_dir = tmp_path / "hf"
    build_tiny_hf(kind, seed=11, tied=kind == "qwen3").save_pretrained(hf_dir)
    job = _job(shards, hf_dir)
    assert job.model.family == "qwen3" and job.model.qk_norm and not job.model.qkv_bias
    run_distributed(_train, 1, job, str(tmp_path / "run"), timeout=300)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (step1,) = [r for r in rows if r.get("step") == 1 and "loss" in r]
    batch = _first_global_batch(job, tmp_path / "cache")
    assert sum(int(mb["loss_mask"].sum()) for mb in batch) == step1["tokens_seen"]  # the same batch
    expected = _transformers_loss(hf_dir, batch)
    print(f"{kind}: trainer step-1 loss {step1['loss']:.8f}, transformers {expected:.8f}")
    assert step1["loss"] == pytest.approx(expected, abs=1e-5)
