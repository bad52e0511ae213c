"""GPU types the planner knows: published figures, and efficiency factors per operation class.

Peaks are vendor datasheet values (dense, no sparsity): NVIDIA H100 SXM5 80 GB (989.4 TFLOP/s BF16,
3.35 TB/s HBM3, NVLink 4 900 GB/s total = 450 GB/s per direction), H200 SXM 141 GB (same compute,
4.8 TB/s HBM3e), A100 SXM 80 GB (312 TFLOP/s BF16, 2.04 TB/s HBM2e, NVLink 3 600 GB/s = 300 per direction),
HGX B200 180 GB (2250 TFLOP/s BF16 dense, 8 TB/s HBM3e, NVLink 5 1.8 TB/s = 900 per direction). Inter-node:
one 400 Gb/s NDR InfiniBand / ConnectX-7 port per GPU (50 GB/s) on DGX H100/H200/B200, 200 Gb/s HDR
(25 GB/s) on DGX A100.

``PEAK_BF16_DENSE_FLOPS``: the same dense BF16 peaks by ``torch.cuda.get_device_name()``, for MFU (the
trainer's console and the benchmarks).

Efficiency factors (achieved / peak), ``source`` says where each comes from:
* matmul 0.80: measured on this project's H200 (bf16 8192³ matmul ~788 TFLOP/s of 989.4, /work/shared/NOTES.md);
  H100 SXM has the same compute die and is given the same factor; A100/B200 have no measurement here and use
  it as an assumption.
* attention 0.55: FlashAttention-2/-3 papers' forward+backward throughput (A100 ~50-70%, H100 FA3 ~60-75%
  forward, backward lower): a published figure, not measured here.
* memory-bound ops 0.90: device-to-device copy measured on the H200 (~4.3 TB/s of 4.8, NOTES.md).
* NVLink 0.80 and network 0.80 (NCCL bus bandwidth over link peak): typical nccl-tests figures, not measured here.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    """Usable device memory (the datasheet's GB converted to GiB)."""
    bf16_tflops: float
    hbm_tbps: float
    nvlink_gbps: float
    """Per direction, per GPU, GB/s."""
    network_gbps: float
    """Inter-node, per GPU, GB/s."""
    gpus_per_node: int = 8
    matmul_eff: float = 0.80
    attention_eff: float = 0.55
    memory_eff: float = 0.90
    nvlink_eff: float = 0.80
    network_eff: float = 0.80
    source: str = ""


GPUS: dict[str, GPU] = {
    "h100_80gb": GPU("H100 SXM 80GB", 80e9 / 2**30, 989.4, 3.35, 450, 50,
                     source="NVIDIA H100 datasheet; matmul factor measured on H200 (same die)"),
    "h200_141gb": GPU("H200 SXM 141GB", 141e9 / 2**30, 989.4, 4.8, 450, 50,
                      source="NVIDIA H200 datasheet; matmul 0.80 and memory 0.90 measured here (NOTES.md)"),
    "a100_80gb": GPU("A100 SXM 80GB", 80e9 / 2**30, 312.0, 2.04, 300, 25,
                     source="NVIDIA A100 datasheet; efficiency factors assumed (not measured on A100)"),
    "b200": GPU("B200 180GB", 180e9 / 2**30, 2250.0, 8.0, 900, 50,
                source="NVIDIA HGX/DGX B200 datasheet; efficiency factors assumed (not measured on B200)"),
}


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ConfigError(f"plan.gpu={name!r} is not one of {', '.join(GPUS)}")
    return GPUS[name]


PEAK_BF16_DENSE_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989.4e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200", 989.4e12),  # SXM: "NVIDIA H200"
    ("H800", 989.4e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("B200", 2250e12),
)
"""Dense (no sparsity) BF16 tensor-core peak per GPU, FLOP/s, from NVIDIA's datasheets (the "with sparsity"
figure halved), keyed by a substring of ``torch.cuda.get_device_name()``; the more specific names come first."""


def peak_bf16_flops(device_name: str | None) -> float | None:
    """The dense BF16 peak of the GPU ``torch.cuda.get_device_name()`` calls ``device_name`` (the first entry of
    :data:`PEAK_BF16_DENSE_FLOPS` it contains), None if unknown: what MFU divides by (trainer and benchmarks)."""
    if device_name is None:
        return None
    return next((v for k, v in PEAK_BF16_DENSE_FLOPS if k in device_name), None)
