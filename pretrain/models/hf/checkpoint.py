"""Hugging Face checkpoints on disk, family-agnostic: a lazy safetensors reader (:class:`HFCheckpoint`), the
writer (:func:`save_hf_checkpoint`) and a transformers module's weights in checkpoint naming."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from common.errors import QwenPretrainError


class ConversionError(QwenPretrainError, ValueError):
    """A checkpoint or config cannot be converted faithfully (unsupported feature, shape or layout)."""


_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _unfuse_experts(key: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers 5 keeps experts as 3-D tensors in memory; checkpoints use one key per expert."""
    prefix, kind = _FUSED_EXPERTS.match(key).groups()
    out = {}
    for e in range(fused.shape[0]):
        if kind == "gate_up_proj":  # [E, 2I, h], gate first (``.chunk(2, dim=-1)`` of its output)
            gate, up = fused[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"] = gate
            out[f"{prefix}.{e}.up_proj.weight"] = up
        else:  # [E, h, I]
            out[f"{prefix}.{e}.down_proj.weight"] = fused[e]
    return out


def hf_state_dict_from_module(hf_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers model's weights in checkpoint naming (one key per expert; no tied ``lm_head``)."""
    state = {}
    for key, value in hf_model.state_dict().items():
        if _FUSED_EXPERTS.match(key):
            state.update(_unfuse_experts(key, value))
        else:
            state[key] = value
    if getattr(hf_model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def load_hf_module_weights(hf_model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy checkpoint-named weights (one key per expert, no tied ``lm_head``: what
    :func:`hf_state_dict_from_module` and ``to_hf`` give) into a live transformers model, stacking the experts
    where it keeps them fused. Raises :class:`ConversionError` on a shape that differs or a weight left unused."""
    tied = getattr(hf_model.config, "tie_word_embeddings", False)
    used = set()
    with torch.no_grad():
        for key, param in hf_model.state_dict().items():
            if tied and key == "lm_head.weight":
                continue
            m = _FUSED_EXPERTS.match(key)
            if m:  # the inverse of _unfuse_experts
                prefix, kind = m.groups()
                parts = ("gate", "up") if kind == "gate_up_proj" else ("down",)
                names = [[f"{prefix}.{e}.{w}_proj.weight" for w in parts] for e in range(param.shape[0])]
                src = torch.stack([torch.cat([state[n] for n in expert], 0) for expert in names])
                used.update(n for expert in names for n in expert)
            else:
                src = state[key]
                used.add(key)
            if src.shape != param.shape:
                raise ConversionError(f"{key}: weights {tuple(src.shape)} != model {tuple(param.shape)}")
            param.copy_(src)
    unused = set(state) - used
    if unused:
        raise ConversionError(f"weights not used by the HF model: {sorted(unused)[:5]}")


class HFCheckpoint(Mapping):
    """A Hugging Face checkpoint directory read lazily: ``ckpt[name]`` loads one tensor from safetensors.

    Keys use checkpoint naming (``model.layers.0.mlp.experts.3.up_proj.weight``); files that store
    experts fused (transformers 5 in-memory layout) are exposed per expert too.
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.exists():
            raise ConversionError(f"{self.path} does not exist")
        if not (self.path / "config.json").is_file():
            raise ConversionError(f"{self.path} is not a Hugging Face checkpoint (no config.json)")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.path} has no *.safetensors weights (.bin checkpoints are not supported)")
        self._handles = {}
        for f in files:  # opening reads the header and checks it against the file's size
            try:
                self._handles[f.name] = safe_open(str(f), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (not importable)
                raise ConversionError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        self._where: dict[str, tuple[str, str]] = {}  # key -> (file, stored key)
        self._fused: dict[str, str] = {}  # per-expert key -> fused stored key
        for fname, handle in self._handles.items():
            for key in handle.keys():
                if _FUSED_EXPERTS.match(key):
                    shape = handle.get_slice(key).get_shape()
                    for sub in _unfuse_experts(key, torch.empty(shape, device="meta")):
                        self._fused[sub] = key
                self._where[key] = (fname, key)

    def shape(self, key: str) -> tuple[int, ...]:
        """A stored tensor's shape, from the file header (reads no data)."""
        fname, stored = self._where[key]
        return tuple(self._handles[fname].get_slice(stored).get_shape())

    @property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.path))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._fused:
            fused = self[self._fused[key]]
            return _unfuse_experts(self._fused[key], fused)[key]
        if key not in self._where:
            raise KeyError(key)
        fname, stored = self._where[key]
        return self._handles[fname].get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self._where if not _FUSED_EXPERTS.match(k))
        yield from self._fused

    def __len__(self) -> int:
        return sum(1 for _ in self)


def save_hf_checkpoint(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor], hf_config,
                       *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``config.json`` + safetensors (sharded with an index past ``max_shard_bytes``) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(out))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
