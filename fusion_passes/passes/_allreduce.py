"""How an all-reduce looks in the post-grad graph, for the tensor-parallel passes.

PyTorch's functional collectives (also what ``dist.all_reduce`` in place and DTensor's
RowwiseParallel trace to) arrive as ``wait_tensor(all_reduce(x, "sum", group_name))``.
A serving engine's own all-reduce ops, named in ``PassConfig.allreduce_ops`` with the
schema ``(Tensor x, str group_name) -> Tensor``, arrive as one call that sums.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, Node

from ..config import PassConfig
from ._graph import insert_call, is_call

functional = torch.ops._c10d_functional


@dataclasses.dataclass
class AllReduce:
    output: Node  # the node whose value is the reduced tensor
    input: Node
    group_name: str
    custom_op: object | None  # the engine's op, or None for functional collectives

    def parts(self) -> list[Node]:
        return [self.output] if self.custom_op is not None else [self.output, self.output.args[0]]

    def rebuild(self, graph: Graph, new_input: Node) -> Node:
        """The same all-reduce of ``new_input``, inserted at the current insertion point."""
        if self.custom_op is not None:
            return insert_call(graph, self.custom_op, (new_input, self.group_name))
        reduced = insert_call(graph, functional.all_reduce.default, (new_input, "sum", self.group_name))
        return insert_call(graph, functional.wait_tensor.default, (reduced,))


def custom_allreduce_ops(config: PassConfig) -> tuple:
    resolved = []
    for qualified in config.allreduce_ops:
        namespace, name = qualified.split("::")
        try:
            packet = getattr(getattr(torch.ops, namespace), name)
        except AttributeError as exc:
            raise ValueError(f"PassConfig.allreduce_ops names {qualified!r}, which is not a registered op") from exc
        resolved.append(packet.default)
    return tuple(resolved)


def as_allreduce(node: Node, custom_ops: tuple) -> AllReduce | None:
    """The sum all-reduce whose result ``node`` is, if it is one."""
    if is_call(node, functional.wait_tensor.default):
        start = node.args[0]
        if (
            is_call(start, functional.all_reduce.default)
            and len(start.users) == 1
            and str(start.args[1]).lower() == "sum"
            and isinstance(start.args[2], str)
        ):
            return AllReduce(node, start.args[0], start.args[2], None)
        return None
    if custom_ops and is_call(node, *custom_ops) and isinstance(node.args[1], str):
        return AllReduce(node, node.args[0], node.args[1], node.target)
    return None


def find_allreduces(graph: Graph, config: PassConfig) -> list[AllReduce]:
    custom_ops = custom_allreduce_ops(config)
    found = []
    for node in graph.nodes:
        allreduce = as_allreduce(node, custom_ops)
        if allreduce is not None:
            found.append(allreduce)
    return found
