"""router_gemm: the MoE router linear -> ``fusion_passes::router_gemm``.

Before (``F.linear(x, w, b)`` as Inductor hands it over; 3-D inputs arrive viewed
to 2-D around the mm)::

    logits = addmm(b, x, permute(w, [1, 0]))         # or mm(...), or mm(...) + b
    ... softmax / sigmoid ...  topk(...)              # routing

After::

    logits = fusion_passes.router_gemm(x, w, b)

Before (DeepSeek-V3 / GLM in transformers: a router in fp32 of a bf16/fp16 model)::

    logits = mm(x.float(), permute(w.float(), [1, 0]))   # casts the whole weight every call

After::

    logits = fusion_passes.router_gemm(x, w, None, torch.float32)   # no cast kernel

Why: at decode sizes (T <= ~128 tokens, E <= 512 experts) the router is a skinny
GEMM that cuBLAS runs at 5-7 us, several times the time to read the weight once.
The op runs its own kernel for small T (batch-invariant: a token's logits do not
depend on what else is in the batch) and cuBLAS above a token threshold, chosen
inside the op because the compiled graph cannot branch on a symbolic token count.

Guard: a 2-D ``[T, H] x [E, H]^T`` product in bf16/fp16/fp32 whose weight is a plain
transpose of an ``[E, H]`` tensor, with E <= ``PassConfig.max_experts``, whose
output reaches a top-k selection (``aten.topk`` or ``fusion_passes::topk_routing``)
through elementwise, softmax, sigmoid, view and group-mask ops. Any other linear stays as is.
An fp32 product takes the low-precision operands when x, the weight (and the bias)
are all exact upcasts of one bf16/fp16 dtype: their products are exact in fp32, so
``out_dtype=float32`` computes the same GEMM (fp32 accumulation) from the originals.
"""

from __future__ import annotations

import dataclasses
import operator

import torch

from torch.fx import Graph, Node

from .. import ops
from ..config import PassConfig
from ._graph import (
    LOW_PRECISION,
    aten,
    erase_unused,
    fake,
    insert_call,
    is_call,
    prims,
    replace_with,
    rewrite_each,
    strip_upcast,
    upstream,
)

NAME = "router_gemm"

# Ops a router's logits pass through on their way to the top-k.
ROUTING_PATH = (
    aten.view.default,
    aten.reshape.default,
    aten.clone.default,
    aten._to_copy.default,
    prims.convert_element_type.default,
    aten.add.Tensor,
    aten.mul.Tensor,
    aten.sub.Tensor,
    aten.div.Tensor,
    aten.amax.default,
    aten.exp.default,
    aten.sum.dim_IntList,
    aten._softmax.default,
    aten.sigmoid.default,
    # group-limited selection: the group scores and the mask of the dropped groups
    aten.max.dim,
    operator.getitem,
    aten.where.self,
    aten.masked_fill.Scalar,
)
ROUTING_SINKS = (aten.topk.default, ops.topk_routing)
MAX_PATH_LENGTH = 12


@dataclasses.dataclass
class RouterMatch:
    output: Node  # the node whose value the op replaces (mm, addmm, or mm + bias)
    x: Node
    weight: Node
    bias: Node | None
    out_dtype: torch.dtype | None = None  # float32 when x and weight are the low-precision sources of an fp32 router


def _transposed_weight(node) -> Node | None:
    """``w`` for ``permute(w, [1, 0])`` of a 2-D ``w``."""
    if is_call(node, aten.permute.default) and list(node.args[1]) == [1, 0] and fake(node.args[0]).dim() == 2:
        return node.args[0]
    return None


def _trailing_bias(mm: Node) -> Node | None:
    """``b`` when the product's only use is ``mm + b`` with a 1-D ``[E]`` bias."""
    if len(mm.users) != 1:
        return None
    (user,) = mm.users
    if not is_call(user, aten.add.Tensor) or user.args[0] is not mm:
        return None
    bias = user.args[1]
    value = fake(bias)
    if value is None or value.dim() != 1 or value.shape[0] != fake(mm).shape[1] or value.dtype != fake(mm).dtype:
        return None
    return bias


def reaches_routing(node: Node) -> bool:
    """Whether ``node``'s value flows into a top-k within a short routing-like path."""
    frontier, seen = [(node, 0)], {node}
    while frontier:
        current, depth = frontier.pop()
        for user in current.users:
            if is_call(user, *ROUTING_SINKS):
                return True
            if depth < MAX_PATH_LENGTH and user not in seen and is_call(user, *ROUTING_PATH):
                seen.add(user)
                frontier.append((user, depth + 1))
    return False


def match(node: Node, config: PassConfig) -> RouterMatch | None:
    if is_call(node, aten.mm.default):
        x, transposed = node.args
        bias = None
    elif is_call(node, aten.addmm.default) and not node.kwargs:
        bias, x, transposed = node.args
    else:
        return None
    # F.linear(x.float(), w.float()) transposes the upcast weight, or upcasts the transpose.
    weight = _transposed_weight(transposed) or _transposed_weight(strip_upcast(transposed))
    if weight is None:
        return None
    upcast_operands = _low_precision_operands(x, weight, bias)
    if upcast_operands is not None:
        return _router_match(node, *upcast_operands, torch.float32, config)
    return _router_match(node, x, weight, bias, None, config)


def _low_precision_operands(x: Node, weight: Node, bias: Node | None) -> tuple | None:
    """(x, weight, bias) before their exact upcasts, when the router is
    ``F.linear(x.float(), w.float()[, b.float()])`` of one bf16/fp16 dtype. Products of
    such operands are exact in fp32, so the op with ``out_dtype=float32`` computes the
    same GEMM without casting the weight on every call."""
    sources = [strip_upcast(x), strip_upcast(weight)] + ([] if bias is None else [strip_upcast(bias)])
    values = [fake(n) for n in sources]
    if any(v is None for v in values) or {v.dtype for v in values} != {values[0].dtype}:
        return None
    if values[0].dtype not in LOW_PRECISION or sources[0] is x:
        return None
    return (sources[0], sources[1], sources[2] if bias is not None else None)


def _router_match(
    node: Node, x: Node, weight: Node, bias: Node | None, out_dtype, config: PassConfig
) -> RouterMatch | None:
    x_value, w_value, out_value = fake(x), fake(weight), fake(node)
    if x_value is None or x_value.dim() != 2 or x_value.dtype not in ops.ROUTER_GEMM_DTYPES:
        return None
    if w_value.dtype != x_value.dtype or out_value.dtype != (out_dtype or x_value.dtype):
        return None
    num_experts = w_value.shape[0]
    if not isinstance(num_experts, int) or num_experts > config.max_experts:
        return None
    if bias is not None:
        bias_value = fake(bias)
        # addmm also broadcasts a [T, E], [1] or scalar "bias"; only a per-expert [E] is a router bias.
        if (
            bias_value is None
            or bias_value.dim() != 1
            or bias_value.shape[0] != num_experts
            or bias_value.dtype != x_value.dtype
        ):
            return None
        output = node
    elif out_dtype is None:
        bias = _trailing_bias(node)
        output = node if bias is None else next(iter(node.users))
    else:
        output = node
    if not reaches_routing(output):
        return None
    return RouterMatch(output, x, weight, bias, out_dtype)


def replace(graph: Graph, found: RouterMatch) -> None:
    replaced = upstream(found.output, {found.x, found.weight, found.bias})
    with graph.inserting_before(found.output):
        args = (found.x, found.weight, found.bias) + (() if found.out_dtype is None else (found.out_dtype,))
        logits = insert_call(graph, ops.router_gemm, args, origin=found.output)
        replace_with(graph, found.output, logits)
    erase_unused(replaced)


def apply(graph: Graph, config: PassConfig) -> int:
    return rewrite_each(list(graph.nodes), lambda node: match(node, config), lambda found: replace(graph, found))
