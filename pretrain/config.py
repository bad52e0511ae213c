"""Typed configuration of a training job. Defaults live in conf/*.yaml; these classes give types, docs and checks.

Each section validates itself in ``__post_init__`` (run by ``OmegaConf.to_object``); checks that span
sections or need the world size live in :func:`validate_job`, called before any process group starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from common.errors import ConfigError, check_choice
from parallel.config import ParallelConfig
from parallel.layout import ParallelLayout
from pretrain.models.config import ModelConfig
from pretrain.models.decoder.recompute import RecomputeConfig


@dataclass(kw_only=True, slots=True)
class DataConfig:
    paths: list[str] = field(default_factory=lambda: ["outputs/data/default"])
    """Token-shard directories written by ``python -m data_pipeline`` (each holds a manifest.json)."""
    weights: list[float] | None = None
    """Blend weights, one per path (megatron-core's blended dataset); None = proportional to size."""
    seq_len: int = 128
    """Tokens per training sequence."""
    split: str = "98,2,0"
    """Train/validation/test split of the documents, in megatron-core's "a,b,c" form."""
    cache_dir: str | None = None
    """Where megatron-core caches its sample indices; None = ``<run_dir>/data_cache``."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ConfigError("data.paths is empty: give at least one token-shard directory")
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ConfigError(f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}")
        if self.weights is not None and any(w <= 0 for w in self.weights):
            raise ConfigError(f"data.weights must all be positive, got {list(self.weights)}")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ConfigError(f'data.split must look like "100,0,0", got {self.split!r}')


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak (Qwen2: 10%)."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to the peak."""
    decay_steps: int | None = None
    """Steps of warm-up + cosine decay; None = trainer.steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    fused: bool | None = None
    """torch AdamW's fused kernel (one kernel for all parameters). None = auto: fused on CUDA, torch's default
    elsewhere (for-loop on CPU); true/false force it. megatron-core without apex/TransformerEngine steps with
    torch AdamW, which it builds with torch's defaults (foreach on CUDA)."""
    foreach_grad_norm: bool = True
    """Gradient norm and clipping over all gradients with torch's foreach kernels (one device reduction, one host
    sync). false: megatron-core's fallback without apex, which syncs with the host once per gradient tensor."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    mode: str = "offline"
    """'offline' writes run files under the run directory (sync later); 'online' needs WANDB_API_KEY; 'disabled'."""
    project: str = "qwen-pretrain"
    entity: str | None = None
    group: str | None = None
    """Runs of one sweep share a group."""

    def __post_init__(self) -> None:
        check_choice("trainer.wandb.mode", self.mode, ("offline", "online", "disabled"))


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    run_name: str = "default"
    """Names the run directory (runs/<run_name>), stable across restarts so a requeued job resumes."""
    steps: int = 100
    """Optimizer steps to train for."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation makes up the rest)."""
    precision: str = "fp32"
    """bf16: bf16 weights and activations with fp32 master weights and fp32 gradient reduction."""
    seed: int = 1234
    log_every: int = 10
    """Print and log metrics every N steps."""
    save_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    async_save: bool = False
    """Write checkpoints in the background while training continues (published when every rank is done)."""
    plot_loss: bool = True
    """Write loss_curve.png into the run directory at the end."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm (each is skipped)."""
    inject_nan_steps: list[int] = field(default_factory=list)
    """Testing hook: make the loss NaN at these steps (1-based) to exercise the NaN guard."""
    recompute: str = "none"
    """Activation recompute (megatron-core): 'none'; 'selective' recomputes ``recompute_modules`` in backward;
    'full' keeps only each recompute unit's input (see ``recompute_method``) and reruns the layers in backward."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """recompute=selective: which parts ('core_attn', 'mlp', 'moe', 'shared_experts'). core_attn pays off with
    model.attention_backend=local (its softmax is materialised); SDPA/flash kernels already avoid storing it."""
    recompute_method: str = "uniform"
    """recompute=full: 'uniform' checkpoints every unit of ``recompute_num_layers`` layers; 'block' recomputes
    only the first ``recompute_num_layers`` layers of each pipeline stage and stores the rest."""
    recompute_num_layers: int = 1
    """recompute=full: layers per recompute unit (uniform; must divide the layers of a (virtual) pipeline stage)
    or layers recomputed per stage (block)."""
    compile: bool = False
    """torch.compile each transformer layer (MoE: each attention block; megatron's token dispatch is
    data-dependent). Compiles on the first step (tens of seconds)."""
    fused_swiglu: bool | None = None
    """megatron-core's SwiGLU fusion (``bias_activation_fusion``: forward and backward as torch.compile'd kernels,
    no TransformerEngine/apex). None = auto: on CUDA only (on CPU inductor's compile costs more than it saves)."""
    cross_entropy: str = "auto"
    """Loss over the vocabulary: 'megatron' (vocab-parallel cross-entropy: an fp32 copy of the [tokens x vocab]
    logits kept for backward), 'fused' (megatron-core's native fused kernel, bf16 only: it returns bf16 logit
    gradients), 'chunked' (output layer + cross-entropy over ``cross_entropy_chunk`` tokens at a time, logits
    recomputed in backward: no [tokens x vocab] tensor is kept; tp = 1), 'auto' = fused with bf16 on CUDA, else
    megatron."""
    cross_entropy_chunk: int = 2048
    """cross_entropy=chunked: tokens per chunk (each chunk's fp32 logits exist only while it is computed)."""
    moe_grouped_gemm: bool | None = False
    """MoE experts as one grouped GEMM per projection (megatron-core's GroupedMLP on torch._grouped_mm; bf16 only)
    instead of a Python loop over experts (SequentialMLP). None = auto: on CUDA with bf16. Off by default until it
    is measured on a GPU: its checkpoints name expert weights as GroupedMLP does, which the HF exporter and a
    resume with the loop experts do not read yet."""
    eval_every: int = 50
    """Validation loss every N steps and after the last step, on the data.split validation documents; 0 = off."""
    eval_steps: int = 4
    """Batches of global_batch_size sequences per evaluation (the same batches every time)."""
    eval_position_buckets: int = 0
    """Also the validation loss by token position: this many equal slices of [0, data.seq_len) (each must be
    whole), logged as eval/loss_pos_<start>_<end>; 0 = off. Answers "did the long-context stage work"."""
    eval_at_start: bool = False
    """Evaluate once before the first step too (a fresh run only), logged as step 0: the before of a stage."""
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def recompute_config(self) -> RecomputeConfig:
        """``recompute``, ``recompute_modules``, ``recompute_method`` and ``recompute_num_layers`` as one config (the
        flat fields stay what a user types: ``trainer.recompute=full``)."""
        return RecomputeConfig(mode=self.recompute, modules=tuple(self.recompute_modules),
                               method=self.recompute_method, num_layers=self.recompute_num_layers)

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        check_choice("trainer.precision", self.precision, ("fp32", "bf16"))
        if self.max_bad_steps < 1:
            raise ConfigError(f"trainer.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.save_every < 0:
            raise ConfigError(f"trainer.save_every must be >= 0, got {self.save_every}")
        _ = self.recompute_config  # building it checks the four recompute fields together (RecomputeConfig)
        check_choice("trainer.cross_entropy", self.cross_entropy, ("auto", "megatron", "fused", "chunked"))
        if self.cross_entropy_chunk < 1:
            raise ConfigError(f"trainer.cross_entropy_chunk must be >= 1, got {self.cross_entropy_chunk}")
        if self.precision != "bf16" and (self.cross_entropy == "fused" or self.moe_grouped_gemm):
            knob = "trainer.cross_entropy=fused" if self.cross_entropy == "fused" else "trainer.moe_grouped_gemm=true"
            raise ConfigError(f"{knob} needs trainer.precision=bf16 (megatron-core's kernel is bf16-only), got "
                              f"{self.precision!r}")
        if self.eval_every < 0:
            raise ConfigError(f"trainer.eval_every must be >= 0 (0 = no evaluation), got {self.eval_every}")
        if self.eval_steps < 1:
            raise ConfigError(f"trainer.eval_steps must be >= 1, got {self.eval_steps}")
        if self.eval_position_buckets < 0:
            raise ConfigError(f"trainer.eval_position_buckets must be >= 0 (0 = off), got {self.eval_position_buckets}")
        if not self.eval_every and (self.eval_position_buckets or self.eval_at_start):
            knob = "eval_position_buckets" if self.eval_position_buckets else "eval_at_start"
            raise ConfigError(f"trainer.{knob} needs an evaluation: set trainer.eval_every > 0")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"trainer.global_batch_size={self.global_batch_size} is not a multiple of "
                f"trainer.micro_batch_size={self.micro_batch_size}"
            )


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    name: str = "local"
    """'local' runs on this machine; a Slurm cluster name selects the Slurm settings below."""
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    time_min: int = 60
    account: str | None = None


@dataclass(kw_only=True, slots=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def validate_job(job: JobConfig, world_size: int) -> ParallelLayout:
    """Cross-section checks, before any process group exists. Returns the resolved layout (the one resolution of
    ``job.parallel`` on ``world_size`` processes), which the process groups and the build then take."""
    model, parallel, trainer = job.model, job.parallel, job.trainer
    layout = ParallelLayout.resolve(parallel, world_size=world_size).check_model(
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        num_experts=model.num_experts,
        seq_len=job.data.seq_len,
    )
    dp = layout.dp
    per_step = trainer.micro_batch_size * dp
    if trainer.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={trainer.global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size × dp = {trainer.micro_batch_size} × {dp}"
        )
    microbatches = trainer.global_batch_size // per_step
    if parallel.vpp > 1 and microbatches % parallel.pp:
        raise ConfigError(
            f"the interleaved schedule needs the number of microbatches ({microbatches} = global_batch_size / "
            f"(micro_batch_size × dp)) to be a multiple of parallel.pp={parallel.pp}"
        )
    if parallel.cp > 1 and model.attention_backend == "local":
        # megatron-core's local DotProductAttention asserts cp == 1 (its CP lives in TransformerEngine).
        raise ConfigError(
            f"parallel.cp={parallel.cp} needs model.attention_backend=sdpa or auto (context-parallel attention); "
            "'local' is megatron-core's DotProductAttention, which has no context parallelism"
        )
    if model.is_moe and parallel.tp > 1 and not parallel.sequence_parallel:
        # megatron-core 0.16.1's MoELayer.forward raises ValueError in the first training step otherwise.
        raise ConfigError(
            f"parallel.tp={parallel.tp} with a MoE model needs parallel.sequence_parallel=true (megatron-core "
            "trains MoE layers under tensor parallelism only with sequence parallelism); e.g. parallel=tp2_sp"
        )
    if job.data.seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len={job.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    if trainer.async_save and parallel.zero in (2, 3):
        raise ConfigError(
            f"trainer.async_save=true is not supported with parallel.zero={parallel.zero}: DeepSpeed's engine writes "
            "its checkpoint synchronously (megatron-core's asynchronous writer serves parallel.zero=0/1); set "
            "trainer.async_save=false"
        )
    _check_step_knobs(job)
    return layout


def _check_step_knobs(job: JobConfig) -> None:
    """Recompute, compile, fused AdamW and evaluation against the model, layout and data split."""
    model, parallel, trainer = job.model, job.parallel, job.trainer
    if trainer.recompute == "full":
        per_stage = model.num_layers // (parallel.pp * parallel.vpp)
        n, method = trainer.recompute_num_layers, trainer.recompute_method
        # megatron-core indexes past the stage's last layer (IndexError mid-step) when a uniform unit overhangs.
        if (method == "uniform" and per_stage % n) or n > per_stage:
            raise ConfigError(
                f"trainer.recompute_num_layers={n} must {'divide' if method == 'uniform' else 'be at most'} the "
                f"{per_stage} layers of each (virtual) pipeline stage (trainer.recompute_method={method})"
            )
    if trainer.compile and parallel.zero in (2, 3):
        raise ConfigError(
            f"trainer.compile=true is not supported with parallel.zero={parallel.zero} (DeepSpeed gathers and "
            "releases parameters in module hooks; not tried under torch.compile); use parallel.zero=0/1"
        )
    if job.optim.fused:
        import torch
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        kind = "cuda" if torch.cuda.is_available() else "cpu"
        if kind not in _get_fused_kernels_supported_devices():
            raise ConfigError(f"optim.fused=true: this torch ({torch.__version__}) has no fused AdamW for {kind}")
    if trainer.cross_entropy == "chunked" and parallel.tp > 1:
        raise ConfigError(f"trainer.cross_entropy=chunked runs with parallel.tp=1 only (got {parallel.tp}); use 'fused' "
                          "or 'megatron' (vocab-parallel) under tensor parallelism")
    if (n := trainer.eval_position_buckets) and (job.data.seq_len % n or n > job.data.seq_len):
        raise ConfigError(f"trainer.eval_position_buckets={n} must divide data.seq_len={job.data.seq_len} "
                          "(buckets of equal width)")
    if trainer.eval_every and float(job.data.split.split(",")[1]) == 0:
        raise ConfigError(
            f"trainer.eval_every={trainer.eval_every} needs validation documents, but data.split={job.data.split!r} "
            'gives them none: set a validation share (e.g. data.split="98,2,0") or trainer.eval_every=0'
        )


def register_configs() -> None:
    """Register the schema so Hydra type-checks every yaml file and override against it."""
    ConfigStore.instance().store(name="job_schema", node=JobConfig)
