"""Multi-GPU and multi-node runs on ``torch.distributed``, launched with ``torchrun``.

Launch any entry point with torchrun; every process runs the same program and reads its place from the
environment torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``)::

    torchrun --nproc_per_node 2 -m embeddistill.cli distill --config run.yaml            # one node, 2 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m embeddistill.cli distill --config run.yaml                                     # 2 nodes x 8 GPUs

Without ``WORLD_SIZE`` (or with 1) everything here is a no-op and the run is the ordinary single process.

What is distributed (see :class:`embeddistill.training.distillation.DistillationTrainer` and
:class:`embeddistill.models.teachers.EmbeddingCache`):

* **Training** is data parallel (DDP over the query tower). The global batch (``batch_size``) is split into
  equal contiguous slices of query rows, one per rank; every rank scores its queries against the *whole* global
  batch's candidate documents (cross-device negatives). Asymmetric students score against the teacher's
  document embeddings, which are constants every rank holds, so no communication is needed beyond DDP's gradient
  all-reduce. Symmetric students embed one slice of the candidates per rank and all-gather them with
  :func:`gather_with_grad` (the gradient flows back to the rank that embedded each document). Each rank's loss
  is rescaled so that DDP's gradient average is exactly the single-process gradient of the global-batch loss.
* **Teacher encoding** is sharded by text key: each rank encodes the texts whose key hashes to it, writes its
  own cache shards (the rank is in their names), waits at a barrier and then loads everybody's shards.
* **Rank 0 alone** writes the training log, checkpoints, the student and the evaluation; it alone shows
  progress bars. All ranks use the same seeds, so data order and initialisation agree without communication.

Multi-node runs need the output and cache folders on a filesystem every node sees (checkpoints are written by
rank 0 and read by all ranks on ``--resume``; cache shards are read by all ranks).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV = "EMBEDDISTILL_DIST_TIMEOUT_MINUTES"
_REQUIRED_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ValueError):
    """A run launched inconsistently (environment, GPUs, batch size): the message says what to change.

    A ``ValueError`` (a configuration error), so the command line reports it as ``embeddistill: error: ...``.
    """


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        if default is None:
            raise DistributedError(f"${name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"${name} must be an integer, got {value!r}") from None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group torchrun describes in the environment; return this process's device.

    ``device`` is the configured ``training.device`` (``auto``, ``cpu``, ``cuda``): CUDA runs use the NCCL
    backend and GPU ``LOCAL_RANK``; CPU runs use gloo. Does nothing (single process) unless ``WORLD_SIZE`` > 1,
    and nothing when the group is already initialised. Raises :class:`DistributedError` with the fix when the
    launch is inconsistent: torchrun variables missing, more processes per node than visible GPUs, CUDA asked for
    but absent, or the rendezvous failing.
    """
    world = _env_int("WORLD_SIZE", 1)
    use_cuda = _wants_cuda(device)
    if world <= 1:
        return torch.device("cuda") if use_cuda else torch.device("cpu" if device == "auto" else device)
    if is_initialized():
        if dist.get_world_size() != world:
            raise DistributedError(f"the process group has {dist.get_world_size()} ranks but $WORLD_SIZE={world}")
        return torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    missing = [name for name in _REQUIRED_ENV if not os.environ.get(name, "").strip()]
    if missing:
        raise DistributedError(
            f"$WORLD_SIZE={world} but {', '.join('$' + m for m in missing)} unset: launch multi-process runs with "
            "torchrun (e.g. `torchrun --nproc_per_node 2 -m embeddistill.cli distill ...`), or unset $WORLD_SIZE"
        )
    global_rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not 0 <= global_rank < world or not 0 <= local < local_world:
        raise DistributedError(
            f"inconsistent launch: RANK={global_rank}, LOCAL_RANK={local}, LOCAL_WORLD_SIZE={local_world}, "
            f"WORLD_SIZE={world}"
        )
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device!r} asks for CUDA but no GPU is visible; use --device cpu (gloo)")
        count = torch.cuda.device_count()
        if local_world > count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
            raise DistributedError(
                f"{local_world} processes per node but only {count} GPU(s) visible (CUDA_VISIBLE_DEVICES={visible}): "
                f"launch `torchrun --nproc_per_node {count}` (one process per GPU) or train on --device cpu"
            )
        torch.cuda.set_device(local)
        backend, this_device = "nccl", torch.device("cuda", local)
    else:
        backend, this_device = "gloo", torch.device("cpu")
    timeout = timedelta(minutes=_env_int(TIMEOUT_ENV, 60))  # a rank may wait long at a barrier (teacher encoding)
    try:
        device_id = this_device if backend == "nccl" else None
        dist.init_process_group(backend, timeout=timeout, device_id=device_id, rank=global_rank, world_size=world)
    except Exception as error:  # noqa: BLE001 - rendezvous failures come as many exception types
        address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise DistributedError(
            f"torch.distributed initialisation failed (backend {backend}, rank {global_rank} of {world}, "
            f"master {address}): {error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    if global_rank == 0:
        logger.info("torch.distributed: %d ranks, backend %s", world, backend)
    return this_device


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def check_batch_size(batch_size: int) -> None:
    """Every rank gets the same number of queries per step: the global batch must divide by the world size."""
    world = world_size()
    if batch_size % world:
        lower, upper = batch_size // world * world, -(-batch_size // world) * world
        suggestion = f"{lower} or {upper}" if lower else str(upper)
        raise DistributedError(
            f"batch_size {batch_size} is not divisible by the world size {world} (the global batch is split evenly "
            f"across ranks): use a batch size of {suggestion}, or a number of processes that divides {batch_size}"
        )


def shard_bounds(n: int, of_rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of rank ``of_rank``'s contiguous share of ``n`` items (shares differ by at most one)."""
    world = world_size() if world is None else world
    of_rank = rank() if of_rank is None else of_rank
    return n * of_rank // world, n * (of_rank + 1) // world


def shard_of(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of ``items``; concatenating every rank's share in rank order gives ``items``."""
    start, stop = shard_bounds(len(items))
    return items[start:stop]


def owner(key: str, world: int | None = None) -> int:
    """The rank that owns a text key (a stable hash, the same on every rank and in every run)."""
    world = world_size() if world is None else world
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % world


def gather_with_grad(tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order, keeping the gradient to the local part.

    ``sizes`` (each rank's number of rows) may be given when every rank knows them, else they are exchanged.
    Built on ``torch.distributed.nn.functional.all_gather``, whose backward *sums* the gradients that all ranks
    computed for a rank's rows and hands the sum to that rank: with DDP's gradient averaging this is the
    gradient of the mean of the ranks' losses (see ``DistillationTrainer.step``).
    """
    world = world_size()
    if world == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    if sizes is None:
        count = torch.tensor([tensor.shape[0]], device=tensor.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = tensor
    if tensor.shape[0] < longest:  # all_gather needs equal shapes: pad with zero rows, dropped again below
        padded = torch.cat([tensor, tensor.new_zeros(longest - tensor.shape[0], *tensor.shape[1:])])
    parts = all_gather(padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def mean_over_ranks(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """The mean over ranks of each value (a collective: every rank must call it with the same keys)."""
    if world_size() == 1 or not values:
        return values
    names = sorted(values)
    tensor = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    means = dict(zip(names, (tensor / world_size()).tolist(), strict=True))
    return {name: means[name] for name in values}


def from_main(value):
    """Rank 0's ``value`` on every rank (a collective; a single process gets its own back)."""
    if world_size() == 1:
        return value
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    return values[0]


def agree(value, what: str) -> None:
    """Fail clearly when ranks disagree on ``value`` (e.g. the step a resumed run starts from)."""
    if world_size() == 1:
        return
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise DistributedError(
            f"ranks disagree on {what}: {values} (multi-node runs need the output folder on a shared filesystem)"
        )


def unused_parameters(module: nn.Module, example: dict[str, torch.Tensor]) -> list[nn.Parameter]:
    """Trainable parameters that get no gradient from the sentence embedding (e.g. BERT's pooler head).

    Found with one forward/backward pass on ``example`` (RNG state untouched, gradients cleared afterwards).
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        output = module(dict(example))["sentence_embedding"]
        grads = torch.autograd.grad(output.float().sum(), trainable, allow_unused=True)
    return [p for p, g in zip(trainable, grads, strict=True) if g is None]


def data_parallel(module: nn.Module, device: torch.device, example: dict[str, torch.Tensor]) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel (or ``module`` itself in a single process).

    Only trainable parameters take part (DDP skips ``requires_grad=False`` ones, such as frozen word
    embeddings). Parameters the embedding never uses (BERT's pooler) are marked frozen first: they never had a
    gradient, so the optimiser skipped them anyway, and DDP can then run with ``find_unused_parameters=False``
    (no graph traversal per step). Buffers (position ids) are not broadcast: nothing updates them.
    """
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    unused = unused_parameters(module, example)
    for parameter in unused:
        parameter.requires_grad_(False)
    if unused and is_main():
        logger.info("DDP: %d parameter tensors get no gradient and are left out", len(unused))
    # No buffer broadcast before each forward (newer torch names the option forward_sync_buffers).
    parameters = inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": False}
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False, **no_sync
    )
