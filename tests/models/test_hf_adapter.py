"""The HF <-> megatron mapping without process groups: configs, refusals, sharding layouts, files."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qwen2_tiny_hf import VOCAB, build_tiny_hf
from pretrain.models.config import ModelConfig
from pretrain.convert import load_model_config
from pretrain.models.hf import (
    ConversionError,
    HFCheckpoint,
    Layout,
    hf_config_from_model,
    hf_state_dict_from_module,
    megatron_keys,
    model_config_from_hf,
    save_hf_checkpoint,
    to_hf,
    to_megatron,
)

# config.json of the published checkpoints (transformers 4.x format: rope_theta, torch_dtype).
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}
QWEN1_5_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936, "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
    "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
}


def _shape(model: ModelConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in ("name", "max_seq_len")}


@pytest.mark.parametrize("hub, preset", [(QWEN2_7B, "qwen2_7b"), (QWEN1_5_MOE, "qwen1_5_moe_a2_7b")])
def test_published_configs_map_onto_our_presets(hub, preset):
    assert _shape(model_config_from_hf(hub)) == _shape(load_model_config(preset))


@pytest.mark.parametrize("preset", ["qwen2_0_5b", "qwen2_1_5b", "qwen2_7b", "qwen2_72b", "qwen2_57b_a14b",
                                    "qwen1_5_moe_a2_7b", "qwen2_tiny", "qwen2_moe_tiny"])
def test_config_round_trip(preset):
    model = load_model_config(preset)
    vocab = model.vocab_size or 1024
    hf = hf_config_from_model(model, vocab_size=vocab)
    assert hf.architectures == ["Qwen2MoeForCausalLM" if model.is_moe else "Qwen2ForCausalLM"]
    back = model_config_from_hf(hf.to_dict(), name=model.name)
    assert back == dataclasses.replace(model, vocab_size=vocab)


def test_norm_topk_prob_maps_to_moe_norm_topk():
    """Qwen2-MoE releases leave top-k weights unnormalised; a config that normalises them is now representable."""
    assert model_config_from_hf({**QWEN1_5_MOE, "norm_topk_prob": True}).moe_norm_topk is True
    assert model_config_from_hf(QWEN1_5_MOE).moe_norm_topk is False


@pytest.mark.parametrize("change, field", [
    (dict(decoder_sparse_step=2), "decoder_sparse_step"),
    (dict(mlp_only_layers=[3]), "mlp_only_layers"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), "linear"),  # yarn and dynamic are supported
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(model_type="llama"), "model_type"),
])
def test_unsupported_hf_configs_are_refused(change, field):
    with pytest.raises(ConversionError, match=field):
        model_config_from_hf({**QWEN1_5_MOE, **change})


def test_moe_without_shared_expert_cannot_be_exported():
    model = dataclasses.replace(load_model_config("qwen2_moe_tiny"), shared_expert_ffn_hidden_size=None, vocab_size=64)
    with pytest.raises(ConversionError, match="shared_expert_ffn_hidden_size"):
        hf_config_from_model(model)


# --------------------------------------------------------------------------------------------------
# Tensor layouts
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """Tiny dense and MoE HF weights (checkpoint naming) and their model configs."""
    out = {}
    for kind in ("dense", "moe"):
        hf_model = build_tiny_hf(kind)
        out[kind] = (hf_state_dict_from_module(hf_model), model_config_from_hf(hf_model.config))
    return out


def _labelled_attention(model: ModelConfig) -> dict[str, torch.Tensor]:
    """q/k/v weights whose every row holds its head's label: q head i -> i, k head g -> 100 + g, v -> 200 + g."""
    d, h = model.head_dim, model.hidden_size

    def rows(labels):
        return torch.tensor(labels, dtype=torch.float32).repeat_interleave(d)[:, None].expand(-1, h)

    return {"model.layers.0.self_attn.q_proj.weight": rows(range(model.num_heads)),
            "model.layers.0.self_attn.k_proj.weight": rows([100 + g for g in range(model.num_kv_heads)]),
            "model.layers.0.self_attn.v_proj.weight": rows([200 + g for g in range(model.num_kv_heads)])}


def test_qkv_is_grouped_per_query_group_and_split_by_whole_groups(tiny):
    """megatron's layout (SelfAttention.get_query_key_value_tensors): per kv group [its q heads, k, v]."""
    hf, model = tiny["dense"]
    model = dataclasses.replace(model, num_heads=4, num_kv_heads=2)
    hf = {**hf, **_labelled_attention(model)}
    d = model.head_dim
    heads = lambda t: t[::d, 0].tolist()  # noqa: E731 - one label per head
    full = to_megatron(hf, model, Layout())["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert heads(full) == [0, 1, 100, 200, 2, 3, 101, 201]
    for r, expected in enumerate([[0, 1, 100, 200], [2, 3, 101, 201]]):
        local = to_megatron(hf, model, Layout(tp=2, tp_rank=r))["decoder.layers.0.self_attention.linear_qkv.weight"]
        assert heads(local) == expected


def test_swiglu_fc1_shards_are_gate_and_up_halves(tiny):
    hf, model = tiny["dense"]
    f = model.ffn_hidden_size
    gate = torch.arange(f, dtype=torch.float32)[:, None].expand(-1, model.hidden_size)
    hf = {**hf, "model.layers.0.mlp.gate_proj.weight": gate, "model.layers.0.mlp.up_proj.weight": gate + 1000}
    local = to_megatron(hf, model, Layout(tp=2, tp_rank=1))["decoder.layers.0.mlp.linear_fc1.weight"][:, 0]
    assert local.tolist() == list(range(f // 2, f)) + list(range(1000 + f // 2, 1000 + f))


def test_row_parallel_and_vocab_splits(tiny):
    hf, model = tiny["dense"]
    r1 = to_megatron(hf, model, Layout(tp=2, tp_rank=1))
    o = hf["model.layers.2.self_attn.o_proj.weight"]
    assert torch.equal(r1["decoder.layers.2.self_attention.linear_proj.weight"], o[:, o.shape[1] // 2:])
    assert torch.equal(r1["output_layer.weight"], hf["lm_head.weight"][VOCAB // 2:])


def test_pipeline_and_expert_numbering(tiny):
    hf, model = tiny["moe"]
    stage = to_megatron(hf, model, Layout(pp=2, pp_rank=0, vpp=2, vp_stage=1, ep=2, ep_rank=1))
    # chunk (pp_rank 0, vp_stage 1) of 4 layers over 2 x 2 chunks holds global layer 2; EP rank 1 experts 2, 3
    assert torch.equal(stage["decoder.layers.0.mlp.router.weight"], hf["model.layers.2.mlp.gate.weight"])
    down = stage["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"]
    assert torch.equal(down, hf["model.layers.2.mlp.experts.3.down_proj.weight"])
    assert "embedding.word_embeddings.weight" not in stage and "output_layer.weight" not in stage


def test_tied_embeddings(tiny):
    hf, model = tiny["dense"]
    tied = dataclasses.replace(model, tie_embeddings=True)
    hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    assert "output_layer.weight" not in dict(megatron_keys(tied, Layout()))
    last = to_megatron(hf, tied, Layout(pp=2, pp_rank=1))  # the last stage's copy of the embedding
    assert torch.equal(last["output_layer.weight"], hf["model.embed_tokens.weight"])
    shards = [(lay, to_megatron(hf, tied, lay)) for lay in Layout.all(pp=2)]
    assert sorted(to_hf(shards, tied)) == sorted(hf)


@pytest.mark.parametrize("kind, layout", [
    ("dense", dict(tp=2)), ("dense", dict(pp=2, vpp=2, tp=2)), ("dense", dict(pp=4)),
    ("moe", dict(tp=2, ep=4)), ("moe", dict(tp=2, ep=2, etp=1)), ("moe", dict(pp=2, ep=2, etp=2, tp=1)),
])
def test_shards_merge_back_bit_identically(tiny, kind, layout):
    hf, model = tiny[kind]
    shards = [(lay, to_megatron(hf, model, lay, vocab_size=VOCAB + 64)) for lay in Layout.all(**layout)]
    padded = to_hf(shards, model)["model.embed_tokens.weight"]  # every megatron row kept
    assert padded.shape[0] == VOCAB + 64 and padded[VOCAB:].abs().max() == 0  # padding rows are zeros
    back = to_hf(shards, model, hf_vocab_size=VOCAB)
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_incomplete_or_impossible_layouts_are_refused(tiny):
    hf, model = tiny["moe"]
    with pytest.raises(ConversionError, match="key/value heads"):
        to_megatron(hf, model, Layout(tp=4, tp_rank=0))  # 2 kv heads over 4 ranks
    with pytest.raises(ConversionError, match="experts"):
        to_megatron(hf, model, Layout(ep=3, ep_rank=0))
    with pytest.raises(ConversionError, match="more than the megatron vocabulary"):
        to_megatron(hf, model, Layout(), vocab_size=VOCAB - 1)
    shards = [(lay, to_megatron(hf, model, lay)) for lay in Layout.all(tp=2)][:1]  # tp rank 1 missing
    with pytest.raises(ConversionError, match="tensor-parallel ranks"):
        to_hf(shards, model)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def test_checkpoint_reader_accepts_fused_experts_and_sharded_files(tiny, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf_model = build_tiny_hf("moe")
    fused = {k: v.contiguous() for k, v in hf_model.state_dict().items()}  # transformers 5 in-memory naming
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    hf_model.config.save_pretrained(tmp_path / "fused")
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"))
    reader = HFCheckpoint(tmp_path / "fused")
    canonical = tiny["moe"][0]
    assert sorted(reader) == sorted(canonical)
    assert all(torch.equal(reader[k], canonical[k]) for k in canonical)

    out = save_hf_checkpoint(tmp_path / "sharded", canonical, hf_model.config, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(v, canonical[k]) for k, v in hf_state_dict_from_module(loaded).items())


def test_init_from_a_checkpoint_of_another_shape_is_refused(hf_dirs):
    from pretrain.convert import init_chunks_from

    model = dataclasses.replace(load_model_config("qwen2_tiny"), vocab_size=VOCAB)  # hidden 128 vs 64
    with pytest.raises(ConversionError, match="hidden_size: checkpoint 64 vs model 128"):
        init_chunks_from([], model, hf_dirs["dense"])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        HFCheckpoint(tmp_path)
