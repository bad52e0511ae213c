"""Config validation: every bad value is a ConfigError that names its field."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from common.errors import ConfigError
from data_pipeline.config import (
    DEFAULT_CORPUS,
    DataJobConfig,
    ExecutorConfig,
    GopherQualityConfig,
    InputConfig,
    MinhashConfig,
    TokenizerConfig,
    register_configs,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("make, message", [
    (lambda: InputConfig(paths=[]), r"data_pipeline\.input\.paths is empty"),
    (lambda: InputConfig(format="csv"), r"data_pipeline\.input\.format must be one of"),
    (lambda: InputConfig(limit=0), r"data_pipeline\.input\.limit"),
    (lambda: GopherQualityConfig(min_doc_words=-1), r"data_pipeline\.filters\.gopher_quality\.min_doc_words must be >= 0, got -1"),
    (lambda: GopherQualityConfig(max_symbol_word_ratio=1.5), r"filters\.gopher_quality\.max_symbol_word_ratio must be in \[0, 1\]"),
    (lambda: MinhashConfig(num_buckets=0), r"data_pipeline\.dedup\.minhash\.num_buckets must be >= 1"),
    (lambda: TokenizerConfig(vocab_size=100), r"data_pipeline\.tokenizer\.vocab_size must be >= 259"),
    (lambda: TokenizerConfig(source="file"), r"data_pipeline\.tokenizer\.path must be set"),
    (lambda: TokenizerConfig(eos_token="</s>"), r"data_pipeline\.tokenizer\.eos_token='</s>' must be one of"),
    (lambda: TokenizerConfig(backend="rust"), r"data_pipeline\.tokenizer\.backend must be one of"),
    (lambda: TokenizerConfig(backend="bpe_qwen"), r"data_pipeline\.tokenizer\.backend='bpe_qwen' .*source='qwen2'"),
    (lambda: ExecutorConfig(kind="k8s"), r"data_pipeline\.executor\.kind must be one of"),
    (lambda: ExecutorConfig(tasks=0), r"data_pipeline\.executor\.tasks must be >= 1"),
])
def test_bad_values_name_their_field(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_yaml_defaults_load_as_typed_config():
    register_configs()
    with initialize_config_module("conf", version_base=None):
        cfg = compose("data_job", overrides=["data_pipeline.filters.c4.enabled=false"])
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, DataJobConfig)
    dp = job.data_pipeline
    assert dp.input.paths == [DEFAULT_CORPUS] and DEFAULT_CORPUS.endswith("data_pipeline/corpus/sample.jsonl")
    assert dp.output_dir == "outputs/data/default"  # where conf/data/default.yaml points the trainer
    assert dp.tokenizer.special_tokens == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert dp.filters.c4.enabled is False and dp.dedup.minhash.num_buckets == 14
    assert (dp.tokenizer.shuffle_documents, dp.tokenizer.shuffle_seed) == (True, 1234)
