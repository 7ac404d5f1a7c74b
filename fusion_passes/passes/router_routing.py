"""router_routing: ``topk_routing(router_gemm(...))`` -> one ``fusion_passes::router_routing``.

Before (what ``router_gemm`` and ``nan_safe_routing`` leave behind)::

    logits   = fusion_passes.router_gemm(x, w, b, out_dtype)     # [T, E], rounded to out_dtype
    w32, ids = fusion_passes.topk_routing(logits, k, scoring, renormalize, bias,
                                          n_group, topk_group, group_score)
                                          # (or of logits.float(), an exact upcast)

After::

    w32, ids = fusion_passes.router_routing(x, w, b, k, scoring, renormalize, bias,
                                            n_group, topk_group, group_score,
                                            logits_dtype=out_dtype)

Why: at decode sizes the two are two launches, the second waiting for the first; the
fused op is one launch: its CTAs compute and round the logits of their tiles into an
L2-resident workspace, and the last CTA to finish a token tile routes its rows (no second
launch, no wait for one). Above a token bound it runs the two kernels. The result is bitwise the composition's: the op rounds
the logits exactly as ``router_gemm`` does, and ``topk_routing`` reads them in fp32, so an
exact upcast in between changes nothing.

Guard: the ``topk_routing`` input is a ``router_gemm`` output, directly or through one
exact upcast to fp32, and the logits (and the upcast) feed nothing but that
``topk_routing``. Logits that a model also returns, logs or feeds to an auxiliary loss
stay with the two ops.
"""

from __future__ import annotations

import dataclasses

from torch.fx import Graph, Node

from .. import ops
from ..config import PassConfig
from ._graph import arg, erase_unused, getitem_users, insert_multi_output, is_call, rewrite_each, strip_upcast

NAME = "router_routing"

# topk_routing's arguments after the logits, in schema order, with their defaults.
ROUTING_ARGS = (
    ("k", None),
    ("scoring", "softmax"),
    ("renormalize", True),
    ("correction_bias", None),
    ("n_group", 1),
    ("topk_group", 1),
    ("group_score", "top2_sum"),
)


@dataclasses.dataclass
class RouterRoutingMatch:
    routing: Node  # the topk_routing call
    gemm: Node  # the router_gemm call
    upcast: Node | None  # an exact upcast between them


def match(routing: Node) -> RouterRoutingMatch | None:
    if not is_call(routing, ops.topk_routing):
        return None
    logits = routing.args[0]
    gemm = strip_upcast(logits)
    if not is_call(gemm, ops.router_gemm):
        return None
    upcast = logits if logits is not gemm else None
    # The logits (and their upcast) feed nothing but this routing.
    chain = [gemm] + ([upcast] if upcast is not None else [])
    if any(set(node.users) != {consumer} for node, consumer in zip(chain, chain[1:] + [routing])):
        return None
    return RouterRoutingMatch(routing, gemm, upcast)


def replace(graph: Graph, found: RouterRoutingMatch) -> None:
    gemm, routing = found.gemm, found.routing
    x, weight, bias = gemm.args[0], gemm.args[1], arg(gemm, 2, "bias")
    routing_args = tuple(arg(routing, i + 1, name, default) for i, (name, default) in enumerate(ROUTING_ARGS))
    with graph.inserting_before(routing):
        outputs = insert_multi_output(
            graph,
            ops.router_routing,
            (x, weight, bias, *routing_args, arg(gemm, 3, "out_dtype")),
            origin=routing,
        )
    old_outputs = getitem_users(routing)
    for index, new in enumerate(outputs):
        if index in old_outputs:
            old_outputs[index].replace_all_uses_with(new)
    erase_unused([*old_outputs.values(), routing, *([found.upcast] if found.upcast is not None else []), gemm, *outputs])


def apply(graph: Graph, config: PassConfig) -> int:
    calls = [node for node in graph.nodes if is_call(node, ops.topk_routing)]
    return rewrite_each(calls, match, lambda found: replace(graph, found))
