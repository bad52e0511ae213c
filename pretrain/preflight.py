"""Checks of a job's inputs that need no process group: run before torchrun starts (in the launching
process) and again in each rank before ``init_distributed``, so bad input is one line, not a late crash.

* token shards (``data error``): every shard its manifest lists exists, its ``.idx`` header is megatron's
  (magic, version, dtype) and agrees with the manifest (documents, tokens, dtype), its ``.bin`` holds
  exactly those tokens (:func:`common.shards.check_output`), and no id reaches the manifest's ``vocab_size``
  (a full scan once per shard version, kept in ``token_scan.json``: the ranks read what the launcher found);
* the vocabulary (``config error``): ``model.vocab_size`` against the tokenizer and ``parallel.tp``;
* ``model.init_from`` (``config error``): the folder exists, is readable (a truncated safetensors or
  ``.distcp`` file is found from its header/metadata), has this model's shape and enough vocabulary rows;
* the checkpoint a run resumes from (``config error``): its tensors have this model's shape. The shape is
  read from the checkpoint's own metadata (tensor sizes), so every checkpoint ever written can be checked.
"""
from __future__ import annotations

from pathlib import Path

from common.errors import ConfigError
from common.shards import check_output
from pretrain.config import DataConfig, JobConfig
from pretrain.models import rope_scaling
from pretrain.models.config import ModelConfig


# --------------------------------------------------------------------------------------------------
# Token shards
# --------------------------------------------------------------------------------------------------
def check_shards(data: DataConfig) -> None:
    """Every shard of every ``data.paths`` output, as :func:`common.shards.check_output`: the .idx headers
    and sizes against the manifest, and the largest token id against its ``vocab_size`` (scanned once per
    shard version, then read from ``token_scan.json``: the launcher scans, the ranks and later runs do not)."""
    for path in data.paths:
        check_output(path)


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
