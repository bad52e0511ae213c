"""Measure what a built train module really holds, to check the planner's predictions against.

* :func:`model_state_bytes`: bytes of the tensor storages a ``TrainModule`` / ``DeepSpeedTrainModule`` keeps
  between steps, per category (weights, gradients, master weights, optimizer state, buffers), each storage
  counted once, in the first category that claims it (``other=True``: every other live tensor too).
  :func:`before_optimizer_step` calls it (or anything) at the high-water mark, :func:`parameter_count` gives Ψ.
* :class:`SavedTensorMeter`: bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``),
  deduplicated by storage, parameters excluded; per transformer layer, and the live total's peak (tensors
  are tracked until they are freed, so a pipeline schedule's in-flight microbatches show in the peak).
"""
from __future__ import annotations

import gc
import weakref
from collections import defaultdict
from contextlib import contextmanager

import torch

CATEGORIES = ("weights", "gradients", "master_weights", "optimizer_state", "comm_buffers")


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes()) if s.nbytes() else None


def _chunks(module) -> list[torch.nn.Module]:
    return [module.model] if module.layout.deepspeed else list(module.chunks)


def _inner_optimizers(module) -> list[torch.optim.Optimizer]:
    if module.layout.deepspeed:
        return [module.engine.optimizer.optimizer]
    opt = module.optimizer
    return [o.optimizer for o in getattr(opt, "chained_optimizers", [opt]) if o.optimizer is not None]


def _claims(module) -> dict[str, list[torch.Tensor]]:
    claims: dict[str, list[torch.Tensor]] = {c: [] for c in CATEGORIES}
    params = [p for c in _chunks(module) for p in c.parameters()]
    if module.layout.deepspeed:
        zopt = module.engine.optimizer
        # ZeRO-3: this rank's partitions (ds_tensor) and the flat buffer they live in; ZeRO-2: the flat bf16 copy.
        claims["weights"] += [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]
        for name in ("bit16_groups_flat", "fp16_partitioned_groups_flat"):
            claims["weights"] += [t for t in getattr(zopt, name, None) or [] if torch.is_tensor(t)]
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            claims["master_weights"] += [t for t in getattr(zopt, name, None) or [] if torch.is_tensor(t)]
        averaged = getattr(zopt, "averaged_gradients", {}) or {}
        for grads in averaged.values():
            claims["gradients"] += [g for g in (grads if isinstance(grads, list) else [grads]) if torch.is_tensor(g)]
        for name in ("grads_in_partition", "grad_partitions_flat_buffer",
                     "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
            value = getattr(zopt, name, None)
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            claims["gradients"] += [v for v in values if torch.is_tensor(v)]
        claims["gradients"] += [t.grad for t in claims["master_weights"] if t.grad is not None]
        for bucket in (getattr(zopt, "ipg_buckets", {}) or {}).values():
            claims["comm_buffers"] += [v for v in vars(bucket).values() if torch.is_tensor(v)]
        claims["comm_buffers"] += [t for t in getattr(zopt, "ipg_buffer", None) or [] if torch.is_tensor(t)]
    else:
        # megatron DDP: parameters (views into the param buffer under the distributed optimizer) and the
        # fp32 gradient buffers (main_grad views).
        for chunk in module.chunks:
            for buf in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
                if buf.param_data is not None:
                    claims["weights"].append(buf.param_data)
                claims["gradients"].append(buf.grad_data)
        claims["weights"] += params
        claims["gradients"] += [p.main_grad for p in params if getattr(p, "main_grad", None) is not None]
        for opt in _inner_optimizers(module):
            for group in opt.param_groups:
                claims["master_weights"] += group["params"]
    for opt in _inner_optimizers(module):
        claims["optimizer_state"] += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return claims


def model_state_bytes(module, *, other: bool = False) -> dict[str, int]:
    """Bytes per category on this rank (call after an optimizer step, when Adam's moments exist).

    ``other``: also ``"other"``, every further live tensor storage the garbage collector can see (RoPE tables,
    DeepSpeed's ``round_robin_bit16_meta``...): with it, the categories add up to all the tensors of the process.
    """
    seen: set[int] = set()
    out = {c: 0 for c in CATEGORIES}

    def count(category: str, t: torch.Tensor) -> None:
        st = _storage(t)
        if st is not None and st[0] not in seen:
            seen.add(st[0])
            out[category] = out.get(category, 0) + st[1]

    for category, tensors in _claims(module).items():
        for t in tensors:
            count(category, t)
    if other:
        out["other"] = 0
        gc.collect()
        for obj in gc.get_objects():
            try:
                is_tensor = torch.is_tensor(obj)
            except Exception:  # noqa: BLE001 - odd objects in gc
                continue
            if is_tensor:
                count("other", obj)
    return out


def parameter_count(module) -> int:
    """Parameters of the model ``module`` trains, each at full size (ZeRO-3's partitioned ones too)."""
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for c in _chunks(module) for p in c.parameters())


@contextmanager
def before_optimizer_step(module, fn):
    """Call ``fn()`` just before every optimizer step ``module`` takes inside this block: gradients reduced, and
    from the second step on Adam's moments allocated, i.e. the high-water mark of model state."""
    owner = module.engine.optimizer if module.layout.deepspeed else module.optimizer
    original, own = owner.step, "step" in vars(owner)

    def step(*args, **kwargs):
        fn()
        return original(*args, **kwargs)

    owner.step = step
    try:
        yield
    finally:
        if own:
            owner.step = original
        else:
            del owner.step  # the class's method again


class SavedTensorMeter:
    """Bytes saved for backward, by storage. Use ``with meter.layer(i):`` (or :meth:`attach`) to attribute them.

    ``total`` counts each storage once while it is live (a storage freed and allocated again counts again); ``live``/``peak`` follow storages until every
    saved reference to them is freed (after their backward), so ``peak`` is the high-water mark of saved
    activations across a pipeline schedule.
    """

    def __init__(self, exclude: list[torch.Tensor] = ()) -> None:
        self.excluded = {_storage(t)[0] for t in exclude if _storage(t) is not None}
        self.per_layer: dict[object, int] = defaultdict(int)
        self.total = 0
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}
        self._sizes: dict[int, int] = {}
        self.current: object = None
        self._stack: list = []

    def _pack(self, t: torch.Tensor):
        st = _storage(t)
        if st is None or st[0] in self.excluded or isinstance(t, torch.nn.Parameter):
            return t
        ptr, nbytes = st
        if ptr not in self._refs:
            self._refs[ptr] = []
            self._sizes[ptr] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.total += nbytes
            self.per_layer[self.current] += nbytes
        holder = _Holder(t)
        self._refs[ptr].append(weakref.ref(holder, lambda _r, p=ptr: self._release(p)))
        return holder

    def _release(self, ptr: int) -> None:
        refs = self._refs.get(ptr)
        if refs is None:
            return
        if all(r() is None for r in refs):
            del self._refs[ptr]
            self.live -= self._sizes.pop(ptr)

    @staticmethod
    def _unpack(obj):
        return obj.tensor if isinstance(obj, _Holder) else obj

    @contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    def attach(self, layers: dict[object, torch.nn.Module]) -> list:
        """Attribute tensors saved inside each module (forward and recomputation) to its key."""
        handles = []
        for key, mod in layers.items():
            def pre(_m, _a, key=key):
                self._stack.append(self.current)
                self.current = key

            def post(_m, _a, _o):
                self.current = self._stack.pop()

            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
        return handles


class _Holder:
    """What the graph keeps instead of the tensor: freed with the graph, which tells the meter."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
