"""Training on data made the way users make it: several data-stage outputs, each of several shards,
sources of very different sizes, blended.

The fixture runs the real data stage twice: a "web" source of 4 files through 4 tasks (4 shards, its own
trained tokenizer) and a 21-document "books" source of 2 files through 2 tasks (2 shards, loading web's
tokenizer). Under the default split (98,2,0) each books shard has ~10 documents, so megatron-core's
rounding gives it no validation document: before this was planned, training hung forever on it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError
from parallel.testing import have_deepspeed, run_distributed

REPO = Path(__file__).resolve().parents[2]
COMMON = ("trainer.wandb.mode=disabled", "trainer.log_every=1", "data.seq_len=32", "trainer.steps=3",
          "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.eval_every=3", "trainer.eval_steps=1",
          "optim.warmup_steps=1", "trainer.plot_loss=false")


def _data_stage(inputs: list[Path], out: Path, *, tasks: int, tokenizer_from: Path | None = None) -> Path:
    from data_pipeline import run_pipeline
    from data_pipeline.config import ExecutorConfig, TokenizerConfig
    from data_pipeline.testing import no_rule_filters, small_config

    tokenizer = (TokenizerConfig(vocab_size=512) if tokenizer_from is None
                 else TokenizerConfig(source="file", path=str(tokenizer_from / "tokenizer.json")))
    cfg = small_config(inputs, out, tokenizer=tokenizer, filters=no_rule_filters(),
                       executor=ExecutorConfig(tasks=tasks, workers=1))
    run_pipeline(cfg)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    from data_pipeline.testing import write_corpus

    root = tmp_path_factory.mktemp("multishard")
    web = [root / "web" / f"part-{i}.jsonl" for i in range(4)]
    for i, path in enumerate(web):
        write_corpus(path, good=30, exact_dups=0, seed=10 + i)
    books = [root / "books" / f"part-{i}.jsonl" for i in range(2)]
    for i, path in enumerate(books):
        write_corpus(path, good=11 - i, exact_dups=0, seed=100 + i)  # 21 documents in all
    # Folders, as users pass them: datatrove spreads a folder's files over the tasks.
    out_web = _data_stage([root / "web"], root / "out" / "web", tasks=4)
    out_books = _data_stage([root / "books"], root / "out" / "books", tasks=2, tokenizer_from=out_web)
    return {"web": out_web, "books": out_books}


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _job(paths: list[Path], *overrides: str):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from pretrain.config import register_configs

    register_configs()
    joined = ",".join(str(p) for p in paths)
    with initialize_config_module(config_module="conf", version_base=None):
        cfg = compose(config_name="config", overrides=[f"data.paths=[{joined}]", *COMMON, *overrides])
    return OmegaConf.to_object(cfg)


def test_the_data_is_what_users_make(sources):
    """Guards the premise: several shards per output, very different sizes, one tokenizer."""
    web, books = _manifest(sources["web"]), _manifest(sources["books"])
    assert len(web["shards"]) == 4 and len(books["shards"]) == 2
    assert web["documents"] >= 120 and books["documents"] < 30  # + what the (disabled) rule filters would drop
    # Under the default split, megatron-core rounds 2% of a books shard to 0 validation documents.
    assert all(round(0.02 * s["documents"]) == 0 for s in books["shards"])
    assert all(round(0.02 * s["documents"]) >= 1 for s in web["shards"])
    assert web["tokenizer_sha256"] == books["tokenizer_sha256"]


def test_blend_plan_leaves_out_empty_split_parts(sources, caplog):
    from megatron.core.datasets.utils import Split

    from pretrain.data import Shards, plan_blend

    job = _job([sources["web"], sources["books"]], "data.weights=[0.3,0.7]")
    shards = Shards.from_config(job.data)
    assert len(shards.prefixes) == 6
    train = plan_blend(job.data, shards, Split.train)
    assert len(train.prefixes) == 6
    assert train.path_shares == pytest.approx({0: 0.3, 1: 0.7})
    assert sum(train.weights) == pytest.approx(1.0)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        valid = plan_blend(job.data, shards, Split.valid)
    # Only web's shards have validation documents (round(0.02 * ~30) = 1 each); books' (~12 docs) have none.
    assert sorted(valid.prefixes) == sorted(str(sources["web"] / s["prefix"]) for s in _manifest(sources["web"])["shards"])
    assert valid.path_shares == {0: 1.0}
    assert "data.paths[1]" in caplog.text and "no valid documents" in caplog.text


def _mixture(rank: int, world_size: int, job, cache_dir: str, n: int) -> dict:
    """Inside a (1-rank) process group, as megatron's BlendedDataset needs: which source each of the
    first ``n`` training samples came from, and each source's training tokens."""
    from megatron.core.datasets.utils import Split

    from pretrain.data import Shards, build_datasets, plan_blend

    shards = Shards.from_config(job.data)
    train, valid = build_datasets(job.data, shards, seed=1, train_samples=n, valid_samples=16, cache_dir=cache_dir)
    path_of_prefix = {p: i for p, i in zip(shards.prefixes, shards.path_of)}
    path_of_dataset = np.array([path_of_prefix[ds.dataset_path] for ds in train.datasets])
    tokens = [int(ds.dataset.sequence_lengths[ds.indices].sum()) for ds in train.datasets]
    windows_ok = all(np.array_equal(train[i]["tokens"][1:], train[i]["labels"][:-1])
                     and int(train[i]["tokens"].max()) < shards.vocab_size for i in (0, 1, n // 2, n - 1))
    return {
        "realised": np.bincount(path_of_dataset[train.dataset_index[:n]], minlength=2) / n,
        "tokens_by_path": np.bincount(path_of_dataset, weights=tokens, minlength=2),
        "shares": plan_blend(job.data, shards, Split.train).path_shares,
        "valid_len": len(valid),
        "windows_ok": windows_ok,
    }


@pytest.mark.parametrize("weights", [[0.25, 0.75], None])
def test_realised_mixture_matches_the_weights(sources, tmp_path, weights):
    """Count which source each of 4,000 training samples came from (megatron's blend index)."""
    extra = [f"data.weights=[{weights[0]},{weights[1]}]"] if weights else []
    job = _job([sources["web"], sources["books"]], *extra)
    n = 4000
    (got,) = run_distributed(_mixture, 1, job, str(tmp_path), n, timeout=300)
    if weights is None:  # proportional to each source's training tokens
        weights = list(got["tokens_by_path"] / got["tokens_by_path"].sum())
        assert weights[1] < 0.2  # books is the small source
    assert got["shares"] == pytest.approx(dict(enumerate(weights)))
    # megatron's greedy blending keeps every prefix of the index within a sample of its target.
    assert got["realised"] == pytest.approx(weights, abs=2 / n)
    assert got["valid_len"] >= 16
    assert got["windows_ok"]  # every sample a real window of its shard: labels = tokens shifted by one


def test_a_split_that_empties_a_source_is_a_config_error(sources):
    from pretrain.data import Shards, check_blend

    # 3% for training: round(0.03 * ~31) = 1 document per web shard, round(0.03 * ~12) = 0 per books shard.
    job = _job([sources["web"], sources["books"]], "data.split='3,97,0'")
    with pytest.raises(ConfigError, match=r"data.paths\[1\]=.*has no training documents under data.split='3,97,0'"):
        check_blend(job.data, Shards.from_config(job.data), validation=True)
    job = _job([sources["books"]], "data.split='98,2,0'")
    with pytest.raises(ConfigError, match="leaves no validation documents in any shard"):
        check_blend(job.data, Shards.from_config(job.data), validation=True)
    check_blend(job.data, Shards.from_config(job.data), validation=False)  # no evaluation: nothing to refuse


def _plan_then_build(rank: int, world_size: int, job, cache_dir: str) -> list[int]:
    """.idx reads (split_tokens calls) of the check, of a build given its plan, and of a build without one."""
    import pretrain.data as data

    calls, split_tokens = [], data.split_tokens
    data.split_tokens = lambda prefix, bookends: calls.append(prefix) or split_tokens(prefix, bookends)
    shards = data.Shards.from_config(job.data)
    counts = []
    for step in ("check", "build with plan", "build without plan"):
        if step == "check":
            shards = shards.with_blend(data.check_blend(job.data, shards, validation=True))
        else:
            use = shards if step == "build with plan" else dataclasses.replace(shards, blend=None)
            data.build_datasets(job.data, use, seed=1, train_samples=64, valid_samples=8, cache_dir=cache_dir)
        counts.append(len(calls))
        calls.clear()
    return counts


def test_the_blend_is_planned_once_per_process(sources, tmp_path):
    """run() keeps check_blend's plan on the Shards it hands to build_trainer: building reads no .idx again."""
    job = _job([sources["web"], sources["books"]])
    (counts,) = run_distributed(_plan_then_build, 1, job, str(tmp_path), timeout=300)
    assert counts == [12, 0, 12]  # 6 shards x (train, validation)


def test_small_source_without_validation_documents_trains_instead_of_hanging(sources, tmp_path):
    """The reported hang, through the CLI: one clear warning, training and evaluation finish."""
    cmd = [sys.executable, "-m", "pretrain", "parallel=single", f"hydra.run.dir={tmp_path}",
           f"data.paths=[{sources['web']},{sources['books']}]", "data.weights=[0.5,0.5]", *COMMON]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any("eval/loss" in r for r in rows)
    assert "has no valid documents" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# Every layout trains on the blend, and sees the same data as one process
# --------------------------------------------------------------------------------------------------
def _train(rank: int, world_size: int, job, run_dir: str) -> None:
    from pretrain.__main__ import run as run_job

    run_job(job, Path(run_dir))


def _losses(run_dir: Path) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"train": [r["loss"] for r in rows if "loss" in r], "eval": [r["eval/loss"] for r in rows if "eval/loss" in r]}


LAYOUTS = {  # name -> (model kind, overrides, world size)
    "tp2": ("dense", ["parallel=tp2"], 2),
    "tp2-sp": ("dense", ["parallel=tp2_sp"], 2),
    "pp2": ("dense", ["parallel=pp2"], 2),
    "pp2-vpp2": ("dense", ["parallel=pp2_interleaved"], 2),
    "dp2-zero1": ("dense", ["parallel=single", "parallel.zero=1"], 2),
    "cp2": ("dense", ["parallel=cp2"], 2),
    "ep2": ("moe", ["parallel=ep2"], 2),
    "ds-zero2": ("dense", ["parallel=zero2"], 2),
    "tp2-pp2": ("dense", ["parallel=single", "parallel.tp=2", "parallel.pp=2"], 4),
}


@pytest.fixture(scope="module")
def hf_models(sources, tmp_path_factory) -> dict[str, Path]:
    """One set of starting weights per model kind (``model.init_from``): megatron's random init draws
    differently under pipeline and expert parallelism, and this test is about the data, not the init."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "tests" / "models"))
    from qwen2_tiny_hf import build_tiny_hf

    vocab = _manifest(sources["web"])["vocab_size"]
    out = {}
    for kind in ("dense", "moe"):
        out[kind] = tmp_path_factory.mktemp(f"hf-{kind}")
        build_tiny_hf(kind, seed=3, vocab_size=vocab).save_pretrained(out[kind])
    return out


def _blend_job(sources, hf_dir: Path, *overrides: str):
    import dataclasses

    from pretrain.models.hf import HFCheckpoint, model_config_from_hf

    job = _job([sources["web"], sources["books"]], *overrides, "data.weights=[0.4,0.6]")
    job.model = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dir).config, name="tiny"),
                                    init_from=str(hf_dir))
    return job


@pytest.fixture(scope="module")
def references(sources, hf_models, tmp_path_factory) -> dict[str, dict]:
    out = {}
    for kind, hf_dir in hf_models.items():
        run_dir = tmp_path_factory.mktemp(f"ref-{kind}")
        run_distributed(_train, 1, _blend_job(sources, hf_dir, "parallel=single"), str(run_dir), timeout=300)
        out[kind] = _losses(run_dir)
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_on_the_blend_like_one_process(name, sources, hf_models, references, tmp_path):
    kind, overrides, world = LAYOUTS[name]
    if name.startswith("ds-") and not have_deepspeed():
        pytest.skip("DeepSpeed is not installed (the test extra has it)")
    run_distributed(_train, world, _blend_job(sources, hf_models[kind], *overrides), str(tmp_path), timeout=400)
    got, ref = _losses(tmp_path), references[kind]
    assert len(got["train"]) == 3 and len(got["eval"]) == 1
    # fp32, every rank on one thread: the layouts differ from one process only in reduction order.
    assert got["train"] == pytest.approx(ref["train"], abs=1e-4)
    assert got["eval"] == pytest.approx(ref["eval"], abs=1e-4)
