"""Model families: every preset loads through the typed config with its parameter count within 0.2% of the
published size; the registry maps families and transformers model types; conversion refuses what a
family cannot represent with one line naming the field."""
from __future__ import annotations

import pytest

from pretrain.models import registry
from pretrain.convert import load_model_config
from pretrain.models.decoder.flops import param_count

# preset -> (published total parameters, significant digits it is published with). Sources:
# Qwen2.5: the Hugging Face Hub's safetensors parameter count of Qwen/Qwen2.5-<size> (exact);
# Qwen3: the "Number of Parameters" line of each Qwen/Qwen3-<size> model card (rounded as printed there).
PUBLISHED = {
    "qwen2_5_0_5b": (494_032_768, None), "qwen2_5_1_5b": (1_543_714_304, None), "qwen2_5_3b": (3_085_938_688, None),
    "qwen2_5_7b": (7_615_616_512, None), "qwen2_5_14b": (14_770_033_664, None),
    "qwen2_5_32b": (32_763_876_352, None), "qwen2_5_72b": (72_706_203_648, None),
    "qwen3_0_6b": (0.6e9, 1), "qwen3_1_7b": (1.7e9, 2), "qwen3_4b": (4.0e9, 2), "qwen3_8b": (8.2e9, 2),
    "qwen3_14b": (14.8e9, 3), "qwen3_32b": (32.8e9, 3), "qwen3_30b_a3b": (30.5e9, 3), "qwen3_235b_a22b": (235e9, 3),
}
# Qwen3-MoE activated parameters (model cards: 3.3B, 22B). 30B-A3B: 3.35B counted; the card rounds it down.
ACTIVE = {"qwen3_30b_a3b": (3.3e9, 0.02), "qwen3_235b_a22b": (22e9, 0.01)}


def _round(x: float, digits: int | None) -> float:
    return x if digits is None else float(f"{x:.{digits}g}")


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_parameter_count_matches_published(preset):
    published, digits = PUBLISHED[preset]
    count = param_count(load_model_config(preset)).total
    assert abs(_round(count, digits) - published) <= 0.002 * published, (count, published)


@pytest.mark.parametrize("preset", list(ACTIVE))
def test_moe_active_parameters(preset):
    published, tol = ACTIVE[preset]
    assert param_count(load_model_config(preset)).active == pytest.approx(published, rel=tol)


def test_qwen3_presets_have_the_qwen3_switches():
    for preset in [p for p in PUBLISHED if p.startswith("qwen3")] + ["qwen3_tiny", "qwen3_moe_tiny"]:
        m = load_model_config(preset)
        assert (m.family, m.qkv_bias, m.qk_norm) == ("qwen3", False, True), preset
        if m.is_moe:
            assert (m.moe_norm_topk, m.shared_expert_ffn_hidden_size, m.moe_load_balancing) == (
                True, None, "global_batch"), preset
            if preset != "qwen3_moe_tiny":
                assert (m.num_experts, m.moe_topk, m.head_dim) == (128, 8, 128), preset
    tied = {p: load_model_config(p).tie_embeddings for p in PUBLISHED}
    assert [p for p, t in tied.items() if t] == [
        "qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_3b", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b"]


def test_registry_families_and_hf_types():
    assert registry.names() == ("qwen2", "qwen3")
    assert registry.family_of_hf("qwen2_moe").name == "qwen2"
    assert registry.family_of_hf("qwen3_moe").name == "qwen3"
    from pretrain.models.hf import ConversionError

    with pytest.raises(ConversionError, match="model_type='llama' is not supported"):
        registry.family_of_hf("llama")


@pytest.mark.parametrize("change, field", [
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_qwen3_conversion_refuses_what_it_cannot_represent(change, field):
    from transformers import Qwen3Config

    from pretrain.models.hf import ConversionError, model_config_from_hf

    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=256, **change)
    with pytest.raises(ConversionError, match=field) as err:
        model_config_from_hf(config)
    assert "\n" not in str(err.value)


def test_qwen3_config_round_trips_through_transformers():
    from pretrain.models.hf import hf_config_from_model, model_config_from_hf

    for preset in ("qwen3_8b", "qwen3_30b_a3b"):
        m = load_model_config(preset)
        hf = hf_config_from_model(m)
        assert type(hf).__name__ == ("Qwen3MoeConfig" if m.is_moe else "Qwen3Config")
        back = model_config_from_hf(hf, name=m.name)
        # the load-balancing scope is a training choice HF configs do not carry
        assert back == type(m)(**{**{f: getattr(m, f) for f in m.__slots__}, "moe_load_balancing": "micro_batch"})


def test_qwen2_refuses_qwen3_switches():
    import dataclasses

    from pretrain.models.hf import ConversionError, hf_config_from_model

    m = load_model_config("qwen2_5_0_5b")
    with pytest.raises(ConversionError, match="model.qk_norm"):
        hf_config_from_model(dataclasses.replace(m, qk_norm=True))
    with pytest.raises(ConversionError, match="model.qkv_bias"):
        hf_config_from_model(dataclasses.replace(m, qkv_bias=False))
