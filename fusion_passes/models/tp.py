"""Tensor-parallel plumbing for the built-in models.

`all_reduce` is the only place the models communicate; modules call it as
`tp.all_reduce(...)` so it can be swapped (monkeypatched) in one spot.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum `x` over `group` with the functional collective.

    Dynamo traces this to `_c10d_functional.all_reduce` + `wait_tensor`, the form
    the tensor-parallel fusion passes look for.
    """
    return funcol.all_reduce(x, "sum", group)


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """Which shard of the full weights this rank holds; `group=None` is a single device."""

    group: dist.ProcessGroup | None = None
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None) -> TensorParallel:
        if group is None:
            return cls()
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def check_divisible(self, size: int, what: str) -> int:
        """Per-rank share of `size`; raises if the world size does not divide it."""
        if size % self.world_size:
            raise ValueError(
                f"{what} ({size}) is not divisible by the tensor-parallel world size "
                f"({self.world_size})"
            )
        return size // self.world_size

    def split(self, full: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        """This rank's contiguous 1/world_size slice of `full` along `dim`."""
        size = self.check_divisible(full.shape[dim], what)
        return full.narrow(dim, self.rank * size, size).clone()

    def num_local_heads(self, num_heads: int, *, replicate: bool = False) -> int:
        """Heads per rank. With `replicate`, fewer heads than ranks are replicated
        (each rank keeps one), as serving engines do for key/value heads."""
        if replicate and num_heads < self.world_size:
            if self.world_size % num_heads:
                raise ValueError(
                    f"cannot replicate {num_heads} key/value heads over a tensor-parallel "
                    f"world size of {self.world_size}: it must be a multiple of the heads"
                )
            return 1
        return self.check_divisible(num_heads, "number of attention heads")

    def split_heads(
        self, full: torch.Tensor, num_heads: int, *, replicate: bool = False
    ) -> torch.Tensor:
        """This rank's heads of a [num_heads * head_dim, in] projection weight."""
        local = self.num_local_heads(num_heads, replicate=replicate)
        # Rank r holds query heads [r*q/W, (r+1)*q/W); with replication that set
        # maps to key/value head r // (W / num_heads), which keeps GQA aligned.
        first = self.rank * num_heads // self.world_size
        head_dim = full.shape[0] // num_heads
        return full.narrow(0, first * head_dim, local * head_dim).clone()


@contextlib.contextmanager
def fake_tp_group(world_size: int, rank: int = 0) -> Iterator[dist.ProcessGroup]:
    """Yield the default process group of a *fake* backend of `world_size` ranks.

    Lets a tensor-parallel model be traced and compiled on one CPU process, no
    GPUs needed. Collectives do not communicate (an all-reduce returns its input
    unchanged), so outputs are meaningless; only graphs are. The group is
    destroyed on exit.
    """
    if dist.is_initialized():
        raise RuntimeError(
            "fake_tp_group() creates the default process group, but one is already "
            "initialised; call torch.distributed.destroy_process_group() first"
        )
    # Importing this module registers the "fake" backend.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
