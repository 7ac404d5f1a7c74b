"""nan_safe_routing: MoE top-k routing subgraphs -> one ``fusion_passes::topk_routing``.

Before (Qwen3-MoE / Mixtral: softmax -> topk -> renormalize)::

    p        = softmax(logits.float(), -1)        # amax, sub, exp, sum, div
    vals, ids = topk(p, k)
    w        = (vals / vals.sum(-1, keepdim=True)).to(bf16)

Before (gpt-oss: topk -> softmax, which equals the form above)::

    vals, ids = topk(logits, k)
    w        = softmax(vals.float(), -1).to(bf16)

Before (DeepSeek-V3 without groups: sigmoid, selection with a correction bias)::

    s   = sigmoid(logits.float())
    ids = topk(s + e_score_correction_bias, k)[1]
    w   = s.gather(1, ids);  w = w / (w.sum(-1, keepdim=True) + 1e-20)

After (every form)::

    w32, ids = fusion_passes.topk_routing(logits, k, scoring, renormalize, bias)
    w        = w32.to(<the dtype the original consumers saw>)

Why: the composite is 5-10 launches at decode sizes, and ``topk`` over a row of NaNs
(a padding token whose hidden state went bad) returns the same expert k times and
NaN weights, which crashes the MoE kernels downstream. ``topk_routing`` is one
kernel that always returns k distinct ids and finite weights (ops.py has the exact
NaN policy). On finite inputs it computes what the original subgraph computes.

Guard: top-k along the last dim of a 2-D tensor, largest, over at most
``PassConfig.max_experts`` columns (a sampler's top-k over a vocabulary is not
routing), whose score comes from softmax or sigmoid, or whose values feed a softmax
and nothing else. The values that the original graph exposes must be exactly what
the op returns (raw probabilities, or renormalized ones); otherwise no match.
A renormalization ``w / (w.sum() + eps)`` matches when eps is at most 1e-6, where it
only differs from the op's zero-sum guard below fp32 rounding.
"""

from __future__ import annotations

import dataclasses
import operator

from torch.fx import Graph, Node

from .. import ops
from ..config import PassConfig
from ._graph import (
    PREPARE_SOFTMAX_ONLINE,
    after_inputs,
    arg,
    aten,
    convert_dtype,
    erase_unused,
    fake,
    getitem_users,
    insert_multi_output,
    is_call,
    is_last_dim,
    renormalized,
    replace_with,
    rewrite_each,
    softmax_of,
    strip_upcast,
    upstream,
)

NAME = "nan_safe_routing"
MAX_RENORM_EPS = 1e-6


@dataclasses.dataclass
class RoutingMatch:
    topk: Node
    logits: Node
    k: int
    scoring: str
    renormalize: bool
    correction_bias: Node | None
    weights: Node | None  # the node whose value the op's weights replace (None: unused)
    ids: Node | None  # topk's ids getitem (None: unused)


def _scoring_of(score: Node) -> tuple[str, Node, Node | None] | None:
    """(scoring, logits, correction bias) for the tensor topk ranks, or None."""
    logits = softmax_of(score)
    if logits is not None:
        return "softmax", logits, None
    if is_call(score, aten.sigmoid.default):
        return "sigmoid", strip_upcast(score.args[0]), None
    if is_call(score, aten.add.Tensor):
        for sigmoid, bias in (score.args, reversed(score.args)):
            bias_value = fake(bias)
            if (
                is_call(sigmoid, aten.sigmoid.default)
                and bias_value is not None
                and bias_value.dim() == 1
                and bias_value.shape[0] == fake(score).shape[-1]
            ):
                return "sigmoid", strip_upcast(sigmoid.args[0]), bias
    return None


def _renormalization(values: Node) -> tuple[Node, bool] | None:
    """(weights node, renormalize) for the probabilities ``values``."""
    found = renormalized(values)
    if found is None:
        return values, False
    division, eps = found
    if eps > MAX_RENORM_EPS:
        return None
    return division, True


def match(topk: Node, config: PassConfig) -> RoutingMatch | None:
    score = topk.args[0]
    score_value = fake(score)
    if score_value is None or score_value.dim() != 2 or not score_value.dtype.is_floating_point:
        return None
    num_experts = score_value.shape[-1]
    k = topk.args[1]
    if not isinstance(num_experts, int) or num_experts > config.max_experts or not isinstance(k, int):
        return None
    if not is_last_dim(arg(topk, 2, "dim", -1), 2) or not arg(topk, 3, "largest", True):
        return None
    outputs = getitem_users(topk)
    values, ids = outputs.get(0), outputs.get(1)

    scored = _scoring_of(score)
    if scored is not None:
        scoring, logits, bias = scored
        if bias is None:
            if values is None:
                weights, renormalize = None, False
            else:
                found = _renormalization(values)
                if found is None:
                    return None
                weights, renormalize = found
        else:
            # Selection by p + bias; the weights are p gathered at the ids.
            if values is not None or ids is None:
                return None
            sigmoid = next(a for a in score.args if is_call(a, aten.sigmoid.default))
            gathers = [
                u for u in ids.users if is_call(u, aten.gather.default) and u.args[0] is sigmoid and is_last_dim(u.args[1], 2)
            ]
            if len(gathers) != 1:
                return None
            found = _renormalization(gathers[0])
            if found is None:
                return None
            weights, renormalize = found
        return RoutingMatch(topk, logits, k, scoring, renormalize, bias, weights, ids)

    # topk -> softmax (gpt-oss): the values feed one softmax and nothing else.
    if values is None:
        return None
    softmax = _softmax_consuming(values)
    if softmax is None:
        return None
    return RoutingMatch(topk, score, k, "softmax", True, None, _through_downcast(softmax), ids)


def _softmax_consuming(values: Node) -> Node | None:
    """The softmax over ``values`` (or over their exact upcast), if every use of
    ``values`` is inside it."""
    inside, frontier = {values}, [values]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if softmax_of(user) is values:
                body = upstream(user, {values})
                closed = all(set(n.users) <= body for n in body - {user}) and set(values.users) <= body
                return user if closed else None
            if user not in inside and (is_call(user, *SOFTMAX_PIECES) or strip_upcast(user) is node):
                inside.add(user)
                frontier.append(user)
    return None


SOFTMAX_PIECES = (
    aten.amax.default,
    aten.sub.Tensor,
    aten.exp.default,
    aten.sum.dim_IntList,
    PREPARE_SOFTMAX_ONLINE,
    operator.getitem,
)


def _through_downcast(node: Node) -> Node:
    """The softmax result as its consumers see it: through a single trailing dtype cast."""
    if len(node.users) == 1:
        (user,) = node.users
        if convert_dtype(user) is not None:
            return user
    return node


def replace(graph: Graph, found: RoutingMatch) -> None:
    inputs = [found.logits] + ([found.correction_bias] if found.correction_bias is not None else [])
    replaced = upstream(found.topk, inputs) | {n for n in (found.weights, found.ids) if n is not None}
    if found.weights is not None:
        replaced |= upstream(found.weights, inputs)
    with graph.inserting_before(after_inputs(graph, inputs)):
        weights, ids = insert_multi_output(
            graph,
            ops.topk_routing,
            (found.logits, found.k, found.scoring, found.renormalize, found.correction_bias),
            origin=found.topk,
        )
        if found.weights is not None:
            replace_with(graph, found.weights, weights)
        if found.ids is not None:
            found.ids.replace_all_uses_with(ids)
    erase_unused(replaced)


def apply(graph: Graph, config: PassConfig) -> int:
    topks = [node for node in graph.nodes if is_call(node, aten.topk.default)]
    return rewrite_each(topks, lambda topk: match(topk, config), lambda found: replace(graph, found))
