"""Fixtures for the Qwen2 HF adapter tests (builders live in qwen2_tiny_hf.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from qwen2_tiny_hf import build_tiny_hf


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models: dense (vocab 256), moe (vocab 256), dense_pad (vocab 250, tied embeddings), qwen3 (tied),
    qwen3_moe."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    models = (("dense", "dense", {}), ("moe", "moe", {}), ("dense_pad", "dense", dict(vocab_size=250, tied=True)),
              ("qwen3", "qwen3", dict(tied=True)), ("qwen3_moe", "qwen3_moe", {}))
    for name, kind, kw in models:
        dirs[name] = root / name
        build_tiny_hf(kind, seed=len(dirs), **kw).save_pretrained(dirs[name])
    return dirs
