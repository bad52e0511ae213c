"""Convert checkpoints of any model family (Qwen2/2.5, Qwen3, dense and MoE) between Hugging Face and this trainer.

    # HF dir (config.json + safetensors) -> model-only megatron ``torch_dist`` checkpoint (any layout
    # can load it; run under torchrun, or bare: it starts the processes the layout needs, as the trainer does)
    python -m pretrain.convert import --hf Qwen2-0.5B/ --out ckpt/qwen2_0_5b [--tp 2 --pp 2 --ep 1]

    # trainer checkpoint (``runs/<name>/checkpoints``, a ``step_XXXXXXXX`` dir, or an import dir)
    # -> HF dir that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
    python -m pretrain.convert export --checkpoint runs/x/checkpoints --out hf_out/ [--model qwen2_tiny]

Export needs no process group: it reads the (layout-independent) ``torch_dist`` tensors directly with
``torch.distributed.checkpoint`` and holds the full model in host memory once. A DeepSpeed (parallel.zero
2/3) checkpoint is consolidated from its ZeRO partitions by DeepSpeed's own ``zero_to_fp32`` reader: its
fp32 master weights are exported (``--dtype`` casts them).

A training run starts from converted weights through :func:`init_chunks_from` (an HF dir or a
checkpoint made by ``import``/the trainer), called on freshly built model chunks before the optimizer
exists -- the ``model.init_from`` hook in ``pretrain.build.build_train_module``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from common.cli import BAD_INPUT, exit_bad_input, one_line
from common.errors import ConfigError
from parallel.config import ParallelConfig
from parallel.launch import launched, local_world_size, relaunch_local
from pretrain.checkpoint import saved_deepspeed_layout
from pretrain.models.config import ModelConfig
from pretrain.models.hf import (
    ConversionError,
    HFCheckpoint,
    Layout,
    global_from_checkpoint_tensors,
    hf_config_from_model,
    load_hf_into_chunks,
    model_config_from_hf,
    save_hf_checkpoint,
    to_hf,
    unwrap_chunk,
)

log = logging.getLogger(__name__)

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
# Shape fields an HF checkpoint must agree on with the model it initialises.
_SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "tie_embeddings", "num_experts",
                 "moe_topk", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size", "rope_base", "norm_eps")


# --------------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------------
def check_output_dir(out_dir: str | Path) -> None:
    """Import and export write only into a new or empty folder (nothing of another model is overwritten or mixed)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not an empty folder: choose a new output folder")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint dir (``torch_dist``, or a trainer's DeepSpeed one) from a dir itself, or a checkpoint
    root with a ``latest`` pointer."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "metadata.json").is_file() and saved_deepspeed_layout(path) is None:
        raise ConversionError(f"{path} is not a trainer checkpoint (no metadata.json, deepspeed.json or latest "
                              "pointer)")
    return path


def _load_common(ckpt: Path) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(ckpt)) or {}


def load_model_config(spec: str | Path) -> ModelConfig:
    """A ``ModelConfig`` from a preset name (``conf/model/<name>.yaml``), a model yaml, or a run's
    ``resolved_config.yaml`` (its ``model`` section)."""
    from omegaconf import OmegaConf

    path = Path(spec)
    if not path.is_file():
        path = _CONF_DIR / f"{spec}.yaml"
        if not path.is_file():
            raise ConversionError(f"model config {spec!r}: no such file and no preset {path}")
    raw = OmegaConf.load(path)
    if "model" in raw and "hidden_size" not in raw:
        raw = raw.model
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def _model_config_for(ckpt: Path, common: dict, override: str | None) -> ModelConfig:
    if override is not None:
        return load_model_config(override)
    if "model_config" in common:  # through OmegaConf, so nested sections (rope_scaling) become dataclasses again
        from omegaconf import OmegaConf

        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), common["model_config"]))
    for candidate in (ckpt.parent.parent / "resolved_config.yaml", ckpt.parent / "resolved_config.yaml"):
        if candidate.is_file():
            return load_model_config(candidate)
    raise ConversionError(
        f"cannot tell the model shape of {ckpt}: no model_config in the checkpoint and no resolved_config.yaml "
        "in its run directory; pass --model <preset or yaml>")


def read_checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model tensors (full, unsharded; layers/experts stacked) of a ``torch_dist`` checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt))
    metadata = reader.read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata) and key.startswith(_MODEL_PREFIXES)}
    if "embedding.word_embeddings.weight" not in state:
        raise ConversionError(f"{ckpt} holds no model weights (no embedding.word_embeddings.weight)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no_dist is flagged as a single-process convenience
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def read_deepspeed_model(ckpt: Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The whole model (GPTModel names, fp32 master weights) of a trainer's DeepSpeed ZeRO-2/3 checkpoint,
    consolidated from its partitions by DeepSpeed's ``zero_to_fp32`` (no process group)."""
    from parallel.deepspeed import weights_only_loads

    with weights_only_loads():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The trainer saves each step directory as DeepSpeed's tag under the checkpoint root.
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    state = {k: v for k, v in state.items() if k.startswith(_MODEL_PREFIXES) and torch.is_tensor(v)}
    if model.tie_embeddings:
        state.pop("output_layer.weight", None)
    return state


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, model: str | None = None,
                      hf_vocab_size: int | None = None, dtype: torch.dtype | None = None,
                      copy_files_from: str | Path | None = None) -> Path:
    """Write the model of a trainer/import checkpoint as a Hugging Face checkpoint directory.

    ``hf_vocab_size``: rows to keep (drops megatron's vocabulary padding); default the size recorded
    at import, else every row. ``dtype``: cast the weights (default: as stored). ``copy_files_from``:
    an HF dir whose tokenizer and generation files are copied alongside.
    """
    check_output_dir(out_dir)
    ckpt = resolve_checkpoint_dir(checkpoint)
    deepspeed = saved_deepspeed_layout(ckpt) is not None
    common = {} if deepspeed else _load_common(ckpt)
    model_cfg = _model_config_for(ckpt, common, model)
    if deepspeed:
        global_sd = read_deepspeed_model(ckpt, model_cfg)
    else:
        global_sd = global_from_checkpoint_tensors(read_checkpoint_tensors(ckpt), model_cfg)
    megatron_vocab = global_sd["embedding.word_embeddings.weight"].shape[0]
    if hf_vocab_size is None:
        hf_vocab_size = common.get("hf_vocab_size", megatron_vocab)
    if hf_vocab_size > megatron_vocab:
        raise ConversionError(f"hf_vocab_size={hf_vocab_size} exceeds the checkpoint's {megatron_vocab} rows")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=megatron_vocab)
    hf_sd = to_hf([(Layout(), global_sd)], model_cfg, hf_vocab_size=hf_vocab_size)
    if dtype is not None:
        hf_sd = {k: v.to(dtype) for k, v in hf_sd.items()}
    stored = next(iter(hf_sd.values())).dtype
    if model_cfg.moe_z_loss_coeff:
        log.warning("model.moe_z_loss_coeff=%s has no Hugging Face counterpart; dropped", model_cfg.moe_z_loss_coeff)
    hf_config = hf_config_from_model(model_cfg, vocab_size=hf_vocab_size, dtype=stored)
    out = save_hf_checkpoint(out_dir, hf_sd, hf_config)
    if copy_files_from is not None:
        for f in Path(copy_files_from).iterdir():
            weights_or_config = f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json")
            if f.is_file() and not weights_or_config:
                shutil.copy2(f, out / f.name)
    log.info("exported %s -> %s (%d tensors, vocab %d)", ckpt, out, len(hf_sd), hf_vocab_size)
    return out


# --------------------------------------------------------------------------------------------------
# Import, and initialising a run from converted weights
# --------------------------------------------------------------------------------------------------
def check_same_shape(hf_model: ModelConfig, model: ModelConfig, source: Path) -> None:
    diffs = [f"{f}: checkpoint {getattr(hf_model, f)!r} vs model {getattr(model, f)!r}"
             for f in _SHAPE_FIELDS if getattr(hf_model, f) != getattr(model, f)]
    if not model.is_moe and hf_model.ffn_hidden_size != model.ffn_hidden_size:
        diffs.append(f"ffn_hidden_size: checkpoint {hf_model.ffn_hidden_size} vs model {model.ffn_hidden_size}")
    if diffs:
        raise ConversionError(f"{source} does not fit model {model.name!r}: " + "; ".join(diffs))


def init_chunks_from(chunks: list[torch.nn.Module], model: ModelConfig, source: str | Path) -> None:
    """Overwrite this rank's freshly built model chunks with pretrained weights, under any layout.

    ``source``: a Hugging Face dir (config.json + safetensors; each rank reads only its slices) or a
    ``torch_dist`` checkpoint (made by ``import``, or a trainer checkpoint: only its model part is read),
    or a trainer's DeepSpeed checkpoint (every rank consolidates its fp32 weights).
    Call it before the optimizer is built (its fp32 main weights are copies of the model's).
    Collective when ``source`` is a torch_dist checkpoint.
    """
    source = Path(source)
    if (source / "config.json").is_file():
        hf = HFCheckpoint(source)
        check_same_shape(model_config_from_hf(hf.config), model, source)
        load_hf_into_chunks(chunks, hf, model)
        return
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint_dir(source)
    if saved_deepspeed_layout(ckpt) is not None:
        # Through HF naming: the mapping that slices whole tensors for this rank's layout.
        state = read_deepspeed_model(ckpt, model)
        whole = dataclasses.replace(model, vocab_size=state["embedding.word_embeddings.weight"].shape[0])
        load_hf_into_chunks(chunks, to_hf([(Layout(), state)], whole), model)
        return
    common = _load_common(ckpt)
    if "model_config" in common:
        check_same_shape(ModelConfig(**common["model_config"]), model, ckpt)
    gpts = [unwrap_chunk(c) for c in chunks]
    keys = ["model"] if len(gpts) == 1 else [f"model{i}" for i in range(len(gpts))]
    state = {k: g.sharded_state_dict() for k, g in zip(keys, gpts)}
    try:
        loaded = dist_checkpointing.load(state, str(ckpt))
    except Exception as e:  # noqa: BLE001 - megatron raises assorted types on shape mismatches
        raise ConversionError(f"cannot load the model of {ckpt} into this model: {e}") from e
    for k, g in zip(keys, gpts):
        g.load_state_dict(loaded[k])


def save_model_checkpoint(chunks: list[torch.nn.Module], out_dir: str | Path, common: dict) -> Path:
    """Save the model part of this rank's chunks as a ``torch_dist`` checkpoint (collective)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    out = Path(out_dir)
    if dist.get_rank() == 0:
        if out.exists() and any(out.iterdir()):
            raise ConversionError(f"{out} exists and is not empty")
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    gpts = [unwrap_chunk(c) for c in chunks]
    state = {"model": gpts[0].sharded_state_dict()} if len(gpts) == 1 else {
        f"model{i}": g.sharded_state_dict() for i, g in enumerate(gpts)}
    state.update(common)
    dist_checkpointing.save(state, str(out))
    dist.barrier()
    return out


def plan_import(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1, vpp: int = 1, ep: int = 1,
                etp: int | None = None, vocab_size: int | None = None, world_size: int = 1):
    """Everything ``import`` checks, from ``config.json`` and the safetensors headers alone (no tensor is read,
    no process started): returns the checkpoint, our model config, its HF vocabulary rows and the resolved layout."""
    from parallel.layout import ParallelLayout

    check_output_dir(out_dir)
    hf = HFCheckpoint(hf_dir)
    try:
        hf_config = hf.config
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/JSONDecodeError alike
        raise ConversionError(f"{Path(hf_dir) / 'config.json'} is not a readable model config: {e}") from e
    model = model_config_from_hf(hf_config, name=Path(hf_dir).name)
    if "model.embed_tokens.weight" not in hf:
        raise ConversionError(f"{hf_dir} has no model.embed_tokens.weight")
    hf_vocab = hf.shape("model.embed_tokens.weight")[0]
    vocab = vocab_size if vocab_size is not None else hf_vocab
    if vocab < hf_vocab or vocab % tp:
        raise ConversionError(
            f"megatron vocabulary {vocab} must be >= the checkpoint's {hf_vocab} rows and divisible by tp={tp}; "
            "pass --vocab-size (padding rows are zeros and are dropped again on export)")
    model = dataclasses.replace(model, vocab_size=vocab)
    try:
        layout = ParallelLayout.resolve(ParallelConfig(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp), world_size=world_size)
        layout.check_model(num_layers=model.num_layers, num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
                           num_experts=model.num_experts, seq_len=model.max_seq_len)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    return hf, model, hf_vocab, layout


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1, vpp: int = 1, ep: int = 1,
              etp: int | None = None, vocab_size: int | None = None, seed: int = 0) -> Path:
    """Convert an HF checkpoint dir into a model-only ``torch_dist`` checkpoint (run on every rank)."""
    from parallel.mesh import destroy_distributed, init_distributed, world_size_from_env
    from pretrain.models.decoder.model import build_model_chunks, transformer_config

    hf, model, hf_vocab, layout = plan_import(hf_dir, out_dir, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp,
                                              vocab_size=vocab_size, world_size=world_size_from_env())
    vocab = model.vocab_size
    init_distributed(layout, seed=seed)
    try:
        config = transformer_config(model, layout=layout)
        config.perform_initialization = False  # every weight is overwritten (load checks the key sets)
        chunks = build_model_chunks(model, config, vocab)
        load_hf_into_chunks(chunks, hf, model)
        common = {"model_config": dataclasses.asdict(model), "hf_vocab_size": hf_vocab,
                  "converted_from": str(Path(hf_dir).resolve())}
        return save_model_checkpoint(chunks, out_dir, common)
    finally:
        destroy_distributed()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad command line is one line and exit status 2, like every other bad input (not usage + error)."""
        exit_bad_input("conversion error", f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pretrain.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF dir -> model-only megatron torch_dist checkpoint")
    imp.add_argument("--hf", required=True, help="Hugging Face checkpoint dir (config.json + *.safetensors)")
    imp.add_argument("--out", required=True, help="new checkpoint dir (must not exist or be empty)")
    for name in ("tp", "pp", "vpp", "ep"):
        imp.add_argument(f"--{name}", type=int, default=1,
                         help=f"{name} degree to convert with (the output loads under any layout)")
    imp.add_argument("--etp", type=int, default=None, help="expert tensor-parallel degree (default: tp)")
    imp.add_argument("--vocab-size", type=int, default=None, help="megatron vocabulary (pads the HF rows with zeros)")
    exp = sub.add_parser("export", help="trainer/import checkpoint -> HF dir")
    exp.add_argument("--checkpoint", required=True, help="checkpoint root (with latest), step dir, or import dir")
    exp.add_argument("--out", required=True, help="HF output dir")
    exp.add_argument("--model", default=None, help="model preset name or yaml (default: from the checkpoint/run dir)")
    exp.add_argument("--hf-vocab-size", type=int, default=None, help="vocabulary rows to keep (drops padding)")
    exp.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast weights (default: as stored)")
    exp.add_argument("--copy-files-from", default=None, help="HF dir to copy tokenizer/generation files from")
    return p


def _import_nproc(args: argparse.Namespace) -> int:
    """Processes a bare ``import`` starts: the trainer's local launch rule (enough ranks for the expert groups)."""
    return local_world_size(ParallelConfig(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    try:
        if args.command == "export":
            export_checkpoint(args.checkpoint, args.out, model=args.model, hf_vocab_size=args.hf_vocab_size,
                              dtype=_DTYPES.get(args.dtype), copy_files_from=args.copy_files_from)
            return 0
        if not launched() and _import_nproc(args) > 1:
            # Refuse bad input here, in one process, not in every rank after torchrun has started them.
            plan_import(args.hf, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp,
                        vocab_size=args.vocab_size, world_size=_import_nproc(args))
            return relaunch_local("pretrain.convert", argv, _import_nproc(args))
        import_hf(args.hf, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp,
                  vocab_size=args.vocab_size)
        if int(os.environ.get("RANK", "0")) == 0:
            log.info("imported %s -> %s", args.hf, args.out)
        return 0
    except (ConversionError, ConfigError) as e:
        print(f"conversion error: {one_line(e)}", file=sys.stderr)
        return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
