"""Checks of a job's inputs that need no process group: run before torchrun starts (in the launching
process) and again in each rank before ``init_distributed``, so bad input is one line, not a late crash.

* token shards (``data error``): every shard its manifest lists exists, its ``.idx`` header is megatron's
  (magic, version, dtype) and agrees with the manifest (documents, tokens, dtype), its ``.bin`` holds
  exactly those tokens, and no id reaches the manifest's ``vocab_size``;
* the vocabulary (``config error``): ``model.vocab_size`` against the tokenizer and ``parallel.tp``;
* ``model.init_from`` (``config error``): the folder exists, is readable (a truncated safetensors or
  ``.distcp`` file is found from its header/metadata), has this model's shape and enough vocabulary rows;
* the checkpoint a run resumes from (``config error``): its tensors have this model's shape. The shape is
  read from the checkpoint's own metadata (tensor sizes), so every checkpoint ever written can be checked.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from common.errors import ConfigError, DataError
from pretrain.config import DataConfig, JobConfig
from pretrain.models import rope_scaling
from pretrain.models.config import ModelConfig

_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core indexed_dataset._INDEX_HEADER, version 1
_IDX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents + 1: 34 bytes
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}  # megatron-core indexed_dataset.DType codes


# --------------------------------------------------------------------------------------------------
# Token shards
# --------------------------------------------------------------------------------------------------
def check_shards(data: DataConfig) -> None:
    """Every shard of every ``data.paths`` manifest, as :func:`check_shard` (manifests exist: call it after
    ``Shards.from_config``, which names a missing one)."""
    for path in data.paths:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        for shard in manifest["shards"]:
            check_shard(Path(path) / shard["prefix"], documents=shard.get("documents"), tokens=shard.get("tokens"),
                        dtype=manifest.get("dtype"), vocab_size=int(manifest["vocab_size"]))


def check_shard(prefix: Path, *, documents: int | None, tokens: int | None, dtype: str | None,
                vocab_size: int) -> None:
    """Raise DataError naming the file unless ``prefix``.idx/.bin are a complete megatron shard whose ids
    are all below ``vocab_size``. ``documents``/``tokens``/``dtype``: what the manifest says (None: unknown)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for f in (idx, bin_):
        if not f.is_file():
            raise DataError(f"{f} is missing (listed in {prefix.parent / 'manifest.json'})")
    with idx.open("rb") as stream:
        head = stream.read(_IDX_HEADER.size)
    if len(head) < _IDX_HEADER.size or head[:9] != _IDX_MAGIC:
        raise DataError(f"{idx} is not a megatron .idx file (its header does not start with {_IDX_MAGIC!r})")
    _, version, code, sequences, doc_indices = _IDX_HEADER.unpack(head)
    if version != 1 or code not in _IDX_DTYPES:
        raise DataError(f"{idx}: corrupt header (version {version}, dtype code {code}; megatron writes version 1, "
                        f"dtype codes 1-8)")
    token_dtype = np.dtype(_IDX_DTYPES[code])
    if dtype is not None and token_dtype != np.dtype(dtype):
        raise DataError(f"{idx} stores {token_dtype} tokens but its manifest says dtype={dtype}")
    if documents is not None and (sequences != documents or doc_indices != documents + 1):
        raise DataError(f"{idx}: header counts {sequences} documents but its manifest says {documents} (corrupt header?)")
    # The index: sequence lengths (int32), pointers (int64), document indices (int64), nothing after.
    expected = _IDX_HEADER.size + 12 * sequences + 8 * doc_indices
    if idx.stat().st_size != expected:
        raise DataError(f"{idx} has {idx.stat().st_size} bytes, its header promises {expected} (truncated or corrupt)")
    lengths = np.fromfile(idx, dtype=np.int32, count=sequences, offset=_IDX_HEADER.size)
    in_index = int(lengths.sum(dtype=np.int64))
    if tokens is not None and in_index != tokens:
        raise DataError(f"{idx} indexes {in_index} tokens but its manifest says {tokens}")
    if bin_.stat().st_size != in_index * token_dtype.itemsize:
        raise DataError(f"{bin_} has {bin_.stat().st_size} bytes, expected {in_index * token_dtype.itemsize} "
                        f"({in_index} {token_dtype} tokens): truncated or from another run of the data pipeline")
    if in_index:
        # Reads every token once (a memory map, ~1 GB/s here: a 1 GB shard costs about a second per process
        # that checks it); the cheapest way to find an id the embedding has no row for before step 1.
        largest = int(np.memmap(bin_, dtype=token_dtype, mode="r").max())
        if largest >= vocab_size:
            raise DataError(f"{bin_} holds token id {largest}, but its manifest says vocab_size={vocab_size} "
                            "(shards and manifest come from different tokenizers?)")


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------
def check_vocab(model: ModelConfig, tokenizer_vocab: int, tp: int) -> int:
    """The embedding's row count for this job (``padded_vocab_size``), or ConfigError."""
    from pretrain.models.decoder.model import padded_vocab_size

    vocab = padded_vocab_size(model, tokenizer_vocab, tp)
    if vocab % tp:
        raise ConfigError(f"model.vocab_size={vocab} is not divisible by parallel.tp={tp} (each tensor-parallel rank "
                          "holds an equal slice of the vocabulary)")
    return vocab


def vocab_padding_note(model: ModelConfig, tokenizer_vocab: int, tp: int) -> str | None:
    """What the embedding has beyond the tokenizer's tokens and why (for one log line), or None."""
    vocab = check_vocab(model, tokenizer_vocab, tp)
    if vocab == tokenizer_vocab:
        return None
    if model.vocab_size is None:
        why = (f"a multiple of model.pad_vocab_multiple × parallel.tp = {model.pad_vocab_multiple} × {tp}, for equal "
               "tensor-parallel slices and fast GEMMs")
    else:
        why = f"model.vocab_size={model.vocab_size}"
    return (f"vocabulary padded from the tokenizer's {tokenizer_vocab} tokens to {vocab} embedding rows ({why}); the "
            f"{vocab - tokenizer_vocab} extra rows are never inputs or targets, but their logits enter the softmax")


# --------------------------------------------------------------------------------------------------
# Checkpoints: model.init_from, and the one a run resumes from
# --------------------------------------------------------------------------------------------------
def _metadata(ckpt: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # noqa: BLE001 - torch raises assorted types for a missing or unreadable .metadata
        raise ConfigError(f"{ckpt}: cannot read its torch_dist metadata ({type(e).__name__}: {e})") from e


def check_checkpoint_files(ckpt: Path, what: str) -> None:
    """Every ``.distcp`` file of a ``torch_dist`` checkpoint is as long as its metadata says (cheap: sizes only)."""
    needed: dict[str, int] = {}
    for info in _metadata(ckpt).storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = ckpt / name
        have = f.stat().st_size if f.is_file() else None
        if have is None or have < size:
            state = "is missing" if have is None else f"has {have} bytes, its metadata needs {size} (truncated)"
            raise ConfigError(f"{what}: {f} {state}")


def saved_model_shape(ckpt: Path) -> dict:
    """The model fields a ``torch_dist`` checkpoint's tensor sizes determine (global sizes, any layout)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    sizes = {k: tuple(m.size) for k, m in _metadata(ckpt).state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    emb = sizes.get("embedding.word_embeddings.weight")
    qkv = sizes.get("decoder.layers.self_attention.linear_qkv.weight")
    if emb is None or qkv is None:
        raise ConfigError(f"{ckpt} holds no model weights (no embedding or attention tensors)")
    shape = {"vocab_size": emb[0], "hidden_size": emb[1], "num_layers": qkv[0], "qkv_rows": qkv[1],
             "tie_embeddings": "output_layer.weight" not in sizes, "num_experts": None}
    layer = "decoder.layers.mlp."
    if layer + "router.weight" in sizes:
        shape["num_experts"] = sizes[layer + "router.weight"][1]
        if layer + "experts.experts.linear_fc1.weight" in sizes:  # SequentialMLP: [layers, experts, 2 ffn, h]
            shape["moe_ffn_hidden_size"] = sizes[layer + "experts.experts.linear_fc1.weight"][2] // 2
        shared = sizes.get(layer + "shared_experts.linear_fc1.weight")
        shape["shared_expert_ffn_hidden_size"] = shared[1] // 2 if shared else None
    elif layer + "linear_fc1.weight" in sizes:
        shape["ffn_hidden_size"] = sizes[layer + "linear_fc1.weight"][1] // 2  # SwiGLU: [gate; up]
    return shape


def check_checkpoint_model(ckpt: Path, model: ModelConfig, vocab: int, *, what: str, remedy: str) -> None:
    """ConfigError naming every model field on which a ``torch_dist`` checkpoint differs from ``model`` with
    ``vocab`` embedding rows, before megatron-core's shape-mismatch traceback could. A DeepSpeed checkpoint
    (parallel.zero 2/3) is not checked here: its shapes live in pickles that cost a full read."""
    from pretrain.checkpoint import saved_deepspeed_layout

    if saved_deepspeed_layout(ckpt) is not None:
        return
    saved = saved_model_shape(ckpt)
    diffs = []
    for name in ("hidden_size", "num_layers", "num_experts", "ffn_hidden_size", "moe_ffn_hidden_size",
                 "shared_expert_ffn_hidden_size", "tie_embeddings"):
        if name in saved and getattr(model, name) != saved[name] and not (name == "ffn_hidden_size" and model.is_moe):
            diffs.append(f"model.{name}={getattr(model, name)} (checkpoint: {saved[name]})")
    qkv_rows = (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
    if saved["hidden_size"] == model.hidden_size and qkv_rows != saved["qkv_rows"]:
        diffs.append(f"model.num_heads={model.num_heads} with model.num_kv_heads={model.num_kv_heads} give "
                     f"{qkv_rows} query/key/value rows (checkpoint: {saved['qkv_rows']})")
    if vocab != saved["vocab_size"]:
        diffs.append(f"the vocabulary has {vocab} rows (checkpoint: {saved['vocab_size']}; "
                     f"model.vocab_size={saved['vocab_size']} matches it)")
    if diffs:
        raise ConfigError(f"{what} {ckpt} holds a model of another shape: {'; '.join(diffs)}. {remedy}")


def check_resume_shape(ckpt: Path, model: ModelConfig, vocab: int) -> None:
    """The checkpoint a run resumes from holds this model (:func:`check_checkpoint_model`)."""
    check_checkpoint_model(ckpt, model, vocab, what="this run's checkpoint", remedy=(
        "Resume with the model settings it was saved with, or start a new run (another trainer.run_name)."))
    from pretrain.checkpoint import saved_rope

    rope_scaling.check_change(saved_rope(ckpt), model, f"this run's checkpoint {ckpt.name}")


def check_init_from(model: ModelConfig, vocab: int, tokenizer_vocab: int) -> None:
    """``model.init_from`` exists, is readable and fits this model (shape; enough vocabulary rows)."""
    from pretrain.convert import check_same_shape, resolve_checkpoint_dir
    from pretrain.models.hf import ConversionError, HFCheckpoint, model_config_from_hf

    what = f"model.init_from={model.init_from}"
    source = Path(model.init_from)
    if not source.exists():
        raise ConfigError(f"{what} does not exist")
    try:
        if (source / "config.json").is_file():
            hf = HFCheckpoint(source)  # reads every safetensors header: a truncated file fails here
            check_same_shape(model_config_from_hf(hf.config), model, source)
            rows = hf.shape("model.embed_tokens.weight")[0]
            if tokenizer_vocab > rows:
                raise ConfigError(
                    f"{what}: the tokenizer of data.paths has {tokenizer_vocab} tokens but the checkpoint's embedding "
                    f"only {rows} rows: ids from {rows} on would start from zero rows. Use the checkpoint's tokenizer, "
                    "or train from scratch")
            if vocab < rows:
                raise ConfigError(f"{what}: the checkpoint has {rows} vocabulary rows, more than this model's {vocab}: "
                                  f"set model.vocab_size={rows}")
            return
        ckpt = resolve_checkpoint_dir(source)
    except ConversionError as e:
        raise ConfigError(f"{what}: {e}") from e
    from pretrain.checkpoint import saved_deepspeed_layout, saved_rope

    rope_scaling.check_change(saved_rope(ckpt), model, what)
    if saved_deepspeed_layout(ckpt) is None:
        check_checkpoint_files(ckpt, what)
        check_checkpoint_model(ckpt, model, vocab, what=what + ":", remedy="Choose the model preset it was saved with.")


# --------------------------------------------------------------------------------------------------
# The whole job
# --------------------------------------------------------------------------------------------------
def has_checkpoint(root: Path) -> bool:
    """Whether a run directory's ``checkpoints`` holds a complete checkpoint (so the run will resume)."""
    return any(p.is_dir() and not p.name.endswith(".tmp") for p in Path(root).glob("step_*"))


def check_job(job: JobConfig, *, resume_from: Path | None = None, resumes: bool = False) -> int:
    """Every check above for ``job``. ``resume_from``: the checkpoint the run will resume from (its shape is
    checked); ``resumes``: the run will resume from a checkpoint not chosen yet. Either way ``model.init_from``
    is ignored, as the trainer ignores it. Returns the embedding's row count."""
    from pretrain.data import Shards

    shards = Shards.from_config(job.data)
    check_shards(job.data)
    vocab = check_vocab(job.model, shards.vocab_size, job.parallel.tp)
    if resume_from is not None:
        check_resume_shape(resume_from, job.model, vocab)
    elif job.model.init_from is not None and not resumes:
        check_init_from(job.model, vocab, shards.vocab_size)
    return vocab
