"""slice_before_allreduce: slice the hidden size before the all-reduce, not after.

Before (gpt-oss: the MoE computes a hidden size padded to a multiple of 256, and the
row-parallel down projection leaves partial sums)::

    r = wait_tensor(all_reduce(partial, "sum", group))    # [T, Hp]
    h = r[..., :H]                                        # H < Hp
    ... h + residual -> RMSNorm

After::

    r = wait_tensor(all_reduce(partial[..., :H].contiguous(), "sum", group))   # [T, H]
    ... r + residual -> RMSNorm

Why: summing the padding moves (Hp - H) / Hp more bytes over NVLink for nothing, and
the slice between the all-reduce and the norm hides the all-reduce -> add -> RMSNorm
chain from ``allreduce_rmsnorm``, which runs next. Slicing commutes with a sum.

Guard: every consumer of the reduced tensor is the same slice ``[..., :H]`` of the
last dim with step 1 and H < Hp. A consumer that reads the padding, a slice on
another dim or with a step, and slices of different widths all block the rewrite.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from ..config import PassConfig
from ._allreduce import AllReduce, find_allreduces
from ._graph import arg, aten, erase_unused, fake, insert_call, is_call, is_last_dim, rewrite_each

NAME = "slice_before_allreduce"
SLICE_ARGS = ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1))


def _kept_width(node: Node, padded_width: int, ndim: int) -> int | None:
    """H for ``node = x[..., :H]`` (start 0, step 1, H < padded width), else None."""
    if not is_call(node, aten.slice.Tensor):
        return None
    dim, start, end, step = (arg(node, i, name, default) for i, name, default in SLICE_ARGS)
    if not is_last_dim(dim, ndim) or start not in (0, None) or step != 1 or not isinstance(end, int):
        return None
    return end if 0 < end < padded_width else None


def match(allreduce: AllReduce) -> tuple[AllReduce, int] | None:
    """(the all-reduce, the kept width H) if every consumer slices the same ``[..., :H]``."""
    value = fake(allreduce.output)
    padded_width = value.shape[-1]
    if not isinstance(padded_width, int) or not allreduce.output.users:
        return None
    widths = {_kept_width(user, padded_width, value.dim()) for user in allreduce.output.users}
    if len(widths) != 1 or None in widths:
        return None
    return allreduce, widths.pop()


def replace(graph: Graph, allreduce: AllReduce, width: int) -> None:
    with graph.inserting_before(allreduce.output if allreduce.custom_op else allreduce.output.args[0]):
        origin = allreduce.output
        kept = insert_call(graph, aten.slice.Tensor, (allreduce.input, -1, 0, width), origin=origin)
        contiguous = insert_call(graph, aten.clone.default, (kept,), {"memory_format": torch.contiguous_format}, origin)
        reduced = allreduce.rebuild(graph, contiguous)
    for user in list(allreduce.output.users):
        user.replace_all_uses_with(reduced)
        graph.erase_node(user)
    erase_unused(allreduce.parts())


def apply(graph: Graph, config: PassConfig) -> int:
    return rewrite_each(find_allreduces(graph, config), match, lambda found: replace(graph, *found))
