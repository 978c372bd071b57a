"""Running on one process or several (`torchrun` DDP): which rank this is, the process group, rank 0 first, the
class-balanced sampler split across ranks, and gathering each rank's validation predictions back into one set."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from alnus.errors import AlnusError

_T = TypeVar("_T")


class RankFailedError(AlnusError):
    """Rank 0 failed in a step the other ranks waited for; the message is rank 0's."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, world size and local rank of this process (0, 1, 0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistInfo]:
    """Join the process group `torchrun` describes in the environment (gloo on CPU, NCCL on GPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 and not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    try:
        yield dist_info()
    finally:
        if started:
            dist.destroy_process_group()


def main_first(info: DistInfo, fn: Callable[[], _T]) -> _T | None:
    """Run `fn` on rank 0 while the other ranks wait; a failure there is raised on every rank."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks have heard of it
            error = exc
    if info.world_size > 1:
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and not info.is_main:
            raise RankFailedError(f"rank 0 failed: {message[0]}")
    if error is not None:
        raise error
    return result


class WeightedDistributedSampler(Sampler[int]):
    """Class-balanced sampling with replacement, drawn from (seed, epoch) and split across ranks.

    Every rank draws the same `num_replicas * ceil(n / num_replicas)` indices and keeps every
    `num_replicas`-th one from its rank on; with one replica it is a seeded `WeightedRandomSampler`.
    """

    def __init__(self, weights: Sequence[float], *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(self.weights) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the draw of `epoch`."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.num_replicas
        drawn = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return iter(drawn[self.rank : total : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class IndexedDataset(Dataset):
    """Items with their dataset index, so gathered predictions can be matched and de-duplicated."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, target = self.dataset[i]
        return image, target, i


def gather_predictions(
    indices: torch.Tensor, logits: torch.Tensor, n: int, info: DistInfo
) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' (index, logit) pairs -> exactly one logit per dataset index 0..n-1, in index order.

    DistributedSampler pads the last round with repeated indices so every rank gets as many items; those
    duplicates are dropped here (keeping the first), so a metric is computed on exactly `n` cases.
    """
    if info.world_size > 1:
        parts_i = [torch.empty_like(indices) for _ in range(info.world_size)]
        parts_l = [torch.empty_like(logits) for _ in range(info.world_size)]
        dist.all_gather(parts_i, indices)
        dist.all_gather(parts_l, logits)
        indices, logits = torch.cat(parts_i), torch.cat(parts_l)
    idx = indices.cpu().numpy()
    values = logits.float().cpu().numpy()
    unique, first = np.unique(idx, return_index=True)
    if len(unique) != n or not np.array_equal(unique, np.arange(n)):
        raise RuntimeError(f"gathered predictions cover {len(unique)} distinct items of {n}")
    return unique, values[first]
