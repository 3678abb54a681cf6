"""Where and how a run computes: device, precision, attention kernels, seeding, and the environment record.

Every stage (training, the teacher, evaluation, the benchmarks) asks here instead of deciding for itself, so a
run's device and precision are chosen once, by one rule, and every result file records its machine the same way.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
from collections.abc import Sequence
from importlib import metadata

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from embeddistill.training import distributed

# cuDNN's fused attention, PyTorch's first choice in bf16 on Hopper, builds a plan on the CPU for each new input shape,
# and training meets new shapes nearly every step (chunks of documents of varying count and width): the other fused
# kernels need no plan. 3.6x the steps per second of a symmetric MiniLM student on an H100, 1.15x for a dual-pooling
# CE (benchmarks/results/speed_gpu.json, "symmetric" and "dual_pooling"). Read at each forward pass, so a benchmark
# may swap it (benchmarks/speed_gpu.py does).
TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# What an environment record names by default: the packages whose versions change numbers in results.
RECORDED_PACKAGES = ("embeddistill", "torch", "transformers", "sentence-transformers", "faiss", "numpy")
# Packages published under several distribution names: the first one installed is recorded.
_DISTRIBUTIONS = {"faiss": ("faiss-cpu", "faiss-gpu", "faiss")}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA where a GPU is visible; under torchrun a CUDA run takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())  # one GPU per process: torchrun's LOCAL_RANK
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` trains under bf16 autocast where the hardware computes bf16 natively (CUDA, AVX512-BF16/AMX CPUs).

    Weights and optimiser state stay fp32; only matrix products run in bf16, about 2.5x faster on such CPUs.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def forward_context(device: torch.device, bf16: bool) -> contextlib.ExitStack:
    """A training step's forward pass: bf16 autocast if ``bf16``, attention through ``TRAINING_ATTENTION``'s kernels."""
    context = contextlib.ExitStack()
    context.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
    context.enter_context(sdpa_kernel(TRAINING_ATTENTION))
    return context


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators: a run's initialisation and dropout then repeat exactly.

    NumPy draws in this package use explicit ``default_rng`` seeds (batches, negatives) and need no global seed.
    """
    random.seed(seed)
    torch.manual_seed(seed)


def _version(package: str) -> str | None:
    if package == "embeddistill":  # an editable install's metadata may lag behind the source
        from embeddistill import __version__

        return __version__
    for distribution in _DISTRIBUTIONS.get(package, (package,)):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), which ``platform.processor()`` does not give on Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment_record(packages: Sequence[str] = RECORDED_PACKAGES) -> dict:
    """The software and machine a result was computed on: ``{"versions": {...}, "machine": {...}}``.

    Versions come from the installed distributions (``None`` where one is absent), so the record never imports a
    heavy package just to read its version. The machine part names the CPU, its cores, torch's threads (what CPU
    timings depend on) and the GPU, if any. Pass ``packages=()`` for the Python version and machine alone.
    """
    return {
        "versions": {**{package: _version(package) for package in packages}, "python": platform.python_version()},
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "platform": platform.platform(),
        },
    }
