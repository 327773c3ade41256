"""Data-parallel training under ``torchrun``: the process group, each rank's device, the sharded
training batches and the DistributedDataParallel wrapper.

A run is distributed when ``torchrun`` (or any launcher setting ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``) starts it with ``WORLD_SIZE > 1``. Every rank then builds the same model and
benchmark, trains on its shard of every global batch with gradients averaged by
DistributedDataParallel, evaluates the whole test stream, and only rank 0 writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from ..errors import ConfigError


@dataclass(frozen=True)
class Launch:
    """What the launcher put in the environment."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def launch_from_env(environ=os.environ) -> Launch | None:
    """The launch of this process when started by ``torchrun`` with more than one process."""
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    missing = [key for key in ("RANK", "LOCAL_RANK") if key not in environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset: start distributed runs with "
            "torchrun --nproc_per_node N"
        )
    return Launch(
        rank=int(environ["RANK"]),
        local_rank=int(environ["LOCAL_RANK"]),
        world_size=world,
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group, else from the launcher's environment."""
    if is_distributed():
        return dist.get_rank()
    launch = launch_from_env()
    return launch.rank if launch else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 and in single-process runs: the process that writes results."""
    return rank() == 0


def local_device(device: str) -> torch.device:
    """The torch device of this rank for the configured ``device`` (``cuda`` -> ``cuda:LOCAL_RANK``
    under torchrun)."""
    launch = launch_from_env()
    resolved = torch.device(device)
    if launch is None or resolved.type != "cuda":
        return resolved
    if resolved.index is not None:
        raise ConfigError(
            f"device {device!r} under torchrun: use --device cuda; rank r runs on cuda:LOCAL_RANK "
            "(choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", launch.local_rank)


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Launch | None]:
    """Join the process group of a torchrun launch for the run's ``device`` (nccl on CUDA, gloo
    on CPU) and leave it at the end; a no-op outside torchrun or if already joined."""
    launch = launch_from_env()
    if launch is None or dist.is_initialized():
        yield launch
        return
    target = local_device(device)
    if target.type == "cuda":
        count = torch.cuda.device_count()
        if count < launch.local_world_size:
            raise ConfigError(
                f"torchrun started {launch.local_world_size} processes on this node but only "
                f"{count} CUDA device(s) are visible: use --nproc_per_node {count} or fewer, or "
                "--device cpu"
            )
        torch.cuda.set_device(target)
        dist.init_process_group("nccl", device_id=target)
    elif target.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise ConfigError(f"device {device!r}: distributed runs support cuda and cpu")
    try:
        yield launch
    finally:
        dist.destroy_process_group()


def check_batch_size(batch_size: int) -> None:
    """The global batch must split evenly over the ranks."""
    world = world_size()
    if batch_size % world:
        raise ConfigError(
            f"training.batch_size={batch_size} is the global batch and must be divisible by the "
            f"{world} ranks (e.g. {world * max(1, batch_size // world)})"
        )


def align_rng() -> None:
    """Give every rank rank 0's torch random state (CPU and this rank's CUDA device), so that
    decisions drawn from it at experience boundaries agree."""
    if not is_distributed():
        return
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    state = [(torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)]
    dist.broadcast_object_list(state, src=0)
    cpu_state, cuda_state = state[0]
    torch.set_rng_state(cpu_state)
    if cuda and cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state)


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size`` over a permutation shared by all ranks, each split into
    ``world`` contiguous, disjoint shards; this rank yields its shard (the whole batch when
    ``world`` is 1).

    Every rank yields the same number of batches as a single process with ``batch_size`` would
    (``ceil(n / batch_size)``) and together the ranks see every sample exactly once per epoch,
    with no padding; ``drop_last`` drops the short last batch (``floor``, but at least one
    batch). A last global batch smaller than the number of ranks is merged into the one before
    (one iteration fewer than a single process), so no rank gets an empty shard. Each pass
    (epoch) draws a new permutation from ``seed`` and the pass number (the identity order
    without ``shuffle``).
    """

    def __init__(self, n: int, batch_size: int, *, rank: int, world: int, seed: int,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        if n < world:
            raise ConfigError(
                f"an experience has {n} training samples, fewer than the {world} ranks"
            )
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.shuffle = shuffle
        end = n - n % batch_size if drop_last and n >= batch_size else n
        bounds = list(range(0, end, batch_size)) + [end]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < world:
            del bounds[-2]
        self.bounds = bounds
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def global_sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False)]

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        for start, stop in zip(self.bounds, self.bounds[1:], strict=False):
            yield order[start:stop].tensor_split(self.world)[self.rank].tolist()


def loss_weight(local: int, global_size: int) -> float:
    """Factor on a rank's mean loss so that DDP's average over ranks of the gradients equals the
    gradient of the mean loss over the global batch (1 when the shards are equal)."""
    return local * world_size() / global_size


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place (unchanged outside torchrun)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def any_over_ranks(flags: torch.Tensor) -> list[bool]:
    """Each of ``flags`` (booleans, one dimension), true where it is true on any rank, read on
    the host: one collective and one synchronisation, the same answer on every rank."""
    return [bool(flag) for flag in sum_over_ranks(flags.float()).cpu().tolist()]


def wrap(model: nn.Module, device: torch.device, varying_graph: bool) -> DistributedDataParallel:
    """DDP over ``model``'s currently trainable parameters. Building it broadcasts rank 0's
    parameters and buffers (all adapter state included); buffers are not re-broadcast on every
    forward (they only change at experience boundaries, identically on every rank).

    The graph is declared static (the same parameters used in every iteration, which also
    tolerates trainable parameters the forward pass never uses) unless ``varying_graph``
    (e.g. task-aware heads), where unused parameters are searched for in every iteration."""
    return DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=varying_graph,
        static_graph=not varying_graph,
    )


def state_digest(module: nn.Module) -> str:
    """sha256 over the names and bytes of ``module``'s parameters and buffers (the training
    slot's parameters included)."""
    digest = hashlib.sha256()
    tensors = dict(module.named_buffers())
    tensors.update(module.named_parameters())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replicas_agree(module: nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (True outside torchrun)."""
    if not is_distributed():
        return True
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, state_digest(module))
    return len(set(digests)) == 1
