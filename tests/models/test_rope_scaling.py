"""YaRN / dynamic-NTK RoPE scaling: our megatron-core model against transformers' Qwen2 beyond the original length,
and the ``rope_scaling`` entry through the HF config (export and import)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.testing import run_distributed
from tests.models.qwen2_tiny_hf import VOCAB, build_tiny_hf

B, S, ORIG = 2, 96, 32  # positions 32..95 lie beyond the original length
SCALINGS = {
    "none": None,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}


def _hf_model(scaling: dict | None):
    from transformers import Qwen2ForCausalLM

    base = build_tiny_hf("dense")
    config = base.config
    if scaling is not None:
        config = config.__class__(**{**config.to_dict(), "rope_scaling": scaling,
                                     # dynamic NTK reads its original length from max_position_embeddings
                                     "max_position_embeddings": ORIG if scaling["rope_type"] == "dynamic" else 128})
        config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict(base.state_dict())
    return model


def run_logits(rank: int, world_size: int, hf_states: dict, hf_configs: dict, tokens: torch.Tensor) -> dict:
    from parallel.config import ParallelConfig
    from parallel.mesh import init_distributed
    from pretrain.models.hf import load_hf_into_chunks, model_config_from_hf
    from pretrain.models.decoder.model import build_model_chunks, transformer_config

    init_distributed(ParallelConfig(), seed=0)
    out = {}
    for name, cfg in hf_configs.items():
        model = model_config_from_hf(cfg)
        (chunk,) = build_model_chunks(model, transformer_config(model), VOCAB)
        load_hf_into_chunks([chunk], hf_states[name], model)
        chunk.eval()
        with torch.no_grad():
            out[name] = (chunk(tokens, torch.arange(S).expand(B, S), None), model.rope_scaling)
    return out


@pytest.fixture(scope="module")
def logits():
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (B, S))
    refs, states, configs = {}, {}, {}
    for name, scaling in SCALINGS.items():
        hf = _hf_model(scaling)
        with torch.no_grad():
            refs[name] = hf(tokens).logits
        states[name] = {k: v.clone() for k, v in hf.state_dict().items()}
        configs[name] = hf.config.to_dict()
    (ours,) = run_distributed(run_logits, 1, states, configs, tokens, timeout=300)
    return refs, ours


@pytest.mark.parametrize("name", ["none", "yarn", "dynamic"])
def test_logits_match_transformers_beyond_original_length(logits, name):
    refs, ours = logits
    mine, scaling = ours[name]
    assert scaling.type == (name if name != "none" else "none")
    diff = (mine - refs[name]).abs()
    assert diff[:, ORIG:].max().item() < 1e-4, diff[:, ORIG:].max().item()
    assert diff.max().item() < 1e-4
    if name != "none":  # the scaling is really in effect: far from the plain-RoPE logits past ORIG
        assert (mine[:, ORIG:] - refs["none"][:, ORIG:]).abs().max().item() > 1e-2


def test_yarn_inverse_frequencies_and_attention_factor_equal_transformers():
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pretrain.models.rope_scaling import RopeScalingConfig, yarn_attention_factor, yarn_inv_freq

    for factor, orig, base in [(4.0, 32, 1e6), (8.0, 4096, 1e6), (2.5, 128, 1e4)]:
        cfg = Qwen2Config(hidden_size=512, num_attention_heads=4, max_position_embeddings=int(orig * factor),
                          rope_scaling={"rope_type": "yarn", "factor": factor,
                                        "original_max_position_embeddings": orig}, rope_theta=base)
        ref, attn = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        mine = yarn_inv_freq(128, base, RopeScalingConfig(type="yarn", factor=factor,
                                                          original_max_position_embeddings=orig))
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
        assert yarn_attention_factor(factor) == pytest.approx(attn, abs=1e-12)


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_export_writes_rope_scaling_and_import_reads_it(kind):
    from transformers import AutoConfig

    from pretrain.models.config import ModelConfig
    from pretrain.models.hf import hf_config_from_model, model_config_from_hf
    from pretrain.models.rope_scaling import RopeScalingConfig

    model = ModelConfig(vocab_size=256, max_seq_len=512, rope_base=1e4,
                        rope_scaling=RopeScalingConfig(type=kind, factor=4.0, original_max_position_embeddings=128))
    written = hf_config_from_model(model).to_dict()  # what config.json holds
    reloaded = AutoConfig.for_model(**written)
    assert reloaded.rope_parameters["rope_type"] == kind
    assert reloaded.rope_parameters["factor"] == 4.0
    if kind == "yarn":
        assert reloaded.rope_parameters["original_max_position_embeddings"] == 128
        assert reloaded.max_position_embeddings == 512
    else:
        assert reloaded.max_position_embeddings == 128
    back = model_config_from_hf(written)
    assert back.rope_scaling == model.rope_scaling
    assert back.rope_base == 1e4
    if kind == "yarn":
        assert dataclasses.replace(back, name=model.name) == model


def test_rope_scaling_config_errors_name_the_field():
    from common.errors import ConfigError
    from pretrain.models.rope_scaling import RopeScalingConfig

    with pytest.raises(ConfigError, match="model.rope_scaling.type"):
        RopeScalingConfig(type="linear")
    with pytest.raises(ConfigError, match="model.rope_scaling.original_max_position_embeddings"):
        RopeScalingConfig(type="yarn", factor=4.0)
    with pytest.raises(ConfigError, match="model.rope_scaling.factor"):
        RopeScalingConfig(type="yarn", factor=0.5, original_max_position_embeddings=128)
