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

Before (DeepSeek-V3 / GLM-4.5 / dots1 / EXAONE-MoE: group-limited; ERNIE 4.5 is the
softmax + bias form without groups, renormalized by ``w / clamp(w.sum(), min=eps)``)::

    s      = sigmoid(logits.float());  c = s + e_score_correction_bias
    groups = topk(c.view(T, G, E // G), 2)[0].sum(-1)      # or .max(-1): DeepSeek-V2
    mask   = one-hot of topk(groups, topk_group)[1], expanded to [T, E]
    ids    = topk(c.masked_fill(~mask, -inf), k, sorted=False)[1]
    w      = s.gather(1, ids);  w = w / (w.sum(-1, keepdim=True) + 1e-20);  w = w * scale

Before (Llama 4: top-k of the logits scattered into -inf, then sigmoid; a dense [T, E]
score, sigmoid(-inf) = 0 for the experts not chosen)::

    vals, ids = topk(logits, k)
    scores    = sigmoid(full_like(logits, -inf).scatter(1, ids, vals).float())

After (every form; the group arguments only with groups)::

    w32, ids = fusion_passes.topk_routing(logits, k, scoring, renormalize, bias, G, topk_group, group_score)
    w        = w32.to(<the dtype the original consumers saw>)

After (Llama 4: ``scoring="sigmoid", renormalize=False``; the dense score rebuilt)::

    w32, ids = fusion_passes.topk_routing(logits, k, "sigmoid", False, None)
    scores   = zeros_like(logits, float32).scatter(-1, ids, w32)

Why: the composite is 5-10 launches at decode sizes, and ``topk`` over a row of NaNs
(a padding token whose hidden state went bad) returns the same expert k times and
NaN weights, which crashes the MoE kernels downstream. ``topk_routing`` is one
kernel that always returns k distinct ids and finite weights (ops.py has the exact
NaN policy). On finite inputs it computes what the original subgraph computes, with one
exception: probabilities that the model rounds to bf16/fp16 before ranking them (a softmax
or sigmoid in bf16: DBRX, Mistral 4, ZAYA, LFM2-MoE) are ranked unrounded, as serving
engines do, so where the rounding ties or swaps two scores it may choose another expert
(``PassConfig.upcast_low_precision_routing``; False leaves such routing alone).

Guard: top-k along the last dim of a 2-D tensor (or of an N-D one, routed as [rows, E]
through reshapes, in the forms without groups other than Llama 4's: ZAYA), largest, over at most
``PassConfig.max_experts`` columns (a sampler's top-k over a vocabulary is not
routing), whose score comes from softmax or sigmoid, or whose values feed a softmax
and nothing else, or feed only a scatter into a [T, E] tensor of -inf whose only use
is a sigmoid (Llama 4). The values that the original graph exposes must be exactly
what the op returns (raw probabilities, or renormalized ones); otherwise no match.
A renormalization ``w / (w.sum() + eps)`` (or ``clamp(min=eps)``) matches when eps is at
most 1e-6, where it only differs from the op's zero-sum guard below fp32 rounding. The
group-limited form is recognised by ``_group_limited`` (its docstring says how); a
``routed_scaling_factor`` stays the multiply after the op.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Graph, Node

from .. import ops
from ..config import PassConfig
from ._group_limited import GroupLimited, group_limited
from ._graph import (
    LOW_PRECISION,
    PREPARE_SOFTMAX_ONLINE,
    after_inputs,
    arg,
    aten,
    convert_dtype,
    erase_unused,
    fake,
    full_value,
    getitem_users,
    insert_call,
    insert_multi_output,
    is_call,
    is_last_dim,
    known_equal,
    refill,
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
    groups: GroupLimited | None = None
    dense: DenseScores | None = None
    # For a top-k over the last dim of an N-D score (N > 2): the leading sizes that the op's
    # [rows, k] outputs are reshaped back to (-1 for the one symbolic size). None: 2-D.
    leading: list[int] | None = None

    def group_args(self) -> tuple:
        if self.groups is None or self.groups.n_group == 1:
            return ()  # one group of every expert: exactly the ungrouped op
        return (self.groups.n_group, self.groups.topk_group, self.groups.group_score)


@dataclasses.dataclass
class DenseScores:
    """Llama 4's [T, E] scores: the top-k logits scattered into -inf, then sigmoid, so
    the k chosen experts get their sigmoid and every other expert sigmoid(-inf) = 0."""

    fill: Node  # the [T, E] tensor of -inf that the top-k values are scattered into
    scatter: Node
    sigmoid: Node  # the node whose value the op's weights scattered into zeros replace


@dataclasses.dataclass
class Scored:
    """What a top-k ranks: ``probs`` (softmax or sigmoid of ``logits``) [+ ``bias``]."""

    scoring: str
    logits: Node
    probs: Node
    bias: Node | None


def _probabilities_of(node: Node, upcast_rounded: bool) -> tuple[str, Node] | None:
    """(scoring, logits) if ``node`` is a softmax or sigmoid over the last dim, in fp32 or,
    with ``upcast_rounded`` (``PassConfig.upcast_low_precision_routing``), rounded to
    bf16/fp16 (computed in that dtype, or in fp32 and cast): the op ranks them unrounded."""
    if upcast_rounded:
        node = _before_rounding(node)
    elif fake(node) is None or fake(node).dtype in LOW_PRECISION:
        return None
    logits = softmax_of(node)
    if logits is not None:
        return "softmax", logits
    if is_call(node, aten.sigmoid.default):
        return "sigmoid", strip_upcast(node.args[0])
    return None


def _before_rounding(node: Node) -> Node:
    """The fp32 tensor that ``node`` is rounded to bf16/fp16 from, seen through an exact
    upcast of the rounded tensor (ZAYA adds its bias to ``probs.to(float32)``); else ``node``."""
    rounded = strip_upcast(node)
    if convert_dtype(rounded) in LOW_PRECISION:
        source = fake(rounded.args[0])
        if source is not None and source.dtype == torch.float32:
            return rounded.args[0]
    return node


def _scoring_of(score: Node, upcast_rounded: bool) -> Scored | None:
    """How the tensor a top-k ranks was computed from the logits, or None."""
    found = _probabilities_of(score, upcast_rounded)
    if found is not None:
        return Scored(*found, score, None)
    if is_call(score, aten.add.Tensor):
        for probs, bias in (score.args, reversed(score.args)):
            bias = _per_expert(bias, fake(score).shape[-1])
            found = _probabilities_of(probs, upcast_rounded) if bias is not None else None
            if found is not None:
                return Scored(*found, probs, bias)
    return None


def _per_expert(bias, num_experts: int) -> Node | None:
    """The 1-D [E] tensor that ``bias`` is, or is a [1, E] view of."""
    value = fake(bias)
    if value is not None and value.dim() == 2 and known_equal(value.shape[0], 1) and is_call(bias, *VIEWS):
        bias, value = bias.args[0], fake(bias.args[0])
    if value is None or value.dim() != 1 or not known_equal(value.shape[0], num_experts) or not value.dtype.is_floating_point:
        return None
    return bias


VIEWS = (aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default)


def _renormalization(values: Node) -> tuple[Node, bool] | None:
    """(weights node, renormalize) for the probabilities ``values``."""
    found = renormalized(values)
    if found is None:
        return values, False
    division, eps = found
    if eps > MAX_RENORM_EPS:
        return None
    return division, True


def _gathered(probs: Node, ids: Node | None, ndim: int) -> Node | None:
    """The one ``probs.gather(-1, ids)`` (or a gather of the low-precision tensor that
    ``probs`` is an exact upcast of): the weights of a selection by another score."""
    if ids is None:
        return None
    sources = {probs, strip_upcast(probs)}
    gathers = [
        u for u in ids.users if is_call(u, aten.gather.default) and u.args[0] in sources and is_last_dim(u.args[1], ndim)
    ]
    return gathers[0] if len(gathers) == 1 else None


def _leading_sizes(score_value) -> list[int] | None:
    """The leading sizes of an N-D score as a reshape takes them (-1 for a symbolic one),
    or None when more than one is symbolic (no reshape could restore them)."""
    sizes = [size if isinstance(size, int) else -1 for size in score_value.shape[:-1]]
    return sizes if sizes.count(-1) <= 1 else None


def match(topk: Node, config: PassConfig) -> RoutingMatch | None:
    score = topk.args[0]
    score_value = fake(score)
    if score_value is None or score_value.dim() < 2 or not score_value.dtype.is_floating_point:
        return None
    ndim, num_experts = score_value.dim(), score_value.shape[-1]
    k = topk.args[1]
    if not isinstance(num_experts, int) or num_experts > config.max_experts or not isinstance(k, int):
        return None
    if not is_last_dim(arg(topk, 2, "dim", -1), ndim) or not arg(topk, 3, "largest", True):
        return None
    outputs = getitem_users(topk)
    values, ids = outputs.get(0), outputs.get(1)
    leading = None
    if ndim > 2:  # routing of a [batch, seq, E] score (ZAYA): the ungrouped forms, through reshapes
        leading = _leading_sizes(score_value)
        if leading is None:
            return None

    groups = None
    upcast_rounded = config.upcast_low_precision_routing
    scored = _scoring_of(score, upcast_rounded)
    if scored is None and leading is None:
        groups = group_limited(score)
        scored = _scoring_of(groups.scores, upcast_rounded) if groups is not None else None
        # Filling dropped groups with 0.0 instead of -inf selects the same experts only
        # while every kept score is positive: true of probabilities, not of p + bias.
        if scored is not None and groups.fill == 0.0 and scored.bias is not None:
            return None
    if scored is not None:
        found = _weights_of(scored, values, ids, ndim)
        if found is None:
            return None
        weights, renormalize = found
        return RoutingMatch(
            topk, scored.logits, k, scored.scoring, renormalize, scored.bias, weights, ids, groups, leading=leading
        )

    if values is None:
        return None
    dense = _scattered_sigmoid(score, values, ids) if leading is None else None
    if dense is not None:  # Llama 4: the op's sigmoid weights, without renormalization
        return RoutingMatch(topk, strip_upcast(score), k, "sigmoid", False, None, None, ids, dense=dense)
    # topk -> softmax (gpt-oss): the values feed one softmax and nothing else.
    softmax = _softmax_consuming(values)
    if softmax is None:
        return None
    return RoutingMatch(topk, score, k, "softmax", True, None, _through_downcast(softmax), ids, leading=leading)


def _weights_of(scored: Scored, values: Node | None, ids: Node | None, ndim: int) -> tuple[Node | None, bool] | None:
    """(the node whose value the op's weights replace, renormalize) for a top-k of ``scored``."""
    gathered = _gathered(scored.probs, ids, ndim) if values is None else None
    if gathered is not None:
        return _renormalization(gathered)  # selected by one score, weighted by probs
    if scored.bias is not None:
        return None  # the values are p + bias, not weights
    if values is None:
        return None, False
    return _renormalization(values)


def _scattered_sigmoid(logits: Node, values: Node, ids: Node | None) -> DenseScores | None:
    """``sigmoid(full_like(logits, -inf).scatter(-1, ids, values)[.float()])``, where the
    top-k values feed the scatter and nothing else, and the scattered tensor the sigmoid."""
    if ids is None or len(values.users) != 1:
        return None
    (scatter,) = values.users
    if not is_call(scatter, aten.scatter.src) or not is_last_dim(scatter.args[1], 2):
        return None
    fill, index, source = scatter.args[0], scatter.args[2], scatter.args[3]
    if index is not ids or source is not values or full_value(fill) != float("-inf") or len(fill.users) != 1:
        return None
    if not known_equal(fake(fill).shape, fake(logits).shape) or len(scatter.users) != 1:
        return None
    (sigmoid,) = scatter.users
    if strip_upcast(sigmoid) is scatter and len(sigmoid.users) == 1:  # sigmoid(scores.float())
        (sigmoid,) = sigmoid.users
    if not is_call(sigmoid, aten.sigmoid.default) or strip_upcast(sigmoid.args[0]) is not scatter:
        return None
    return DenseScores(fill, scatter, sigmoid)


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
    if found.dense is not None:
        replaced |= upstream(found.dense.sigmoid, inputs)
    with graph.inserting_before(after_inputs(graph, inputs)):
        logits = found.logits
        if found.leading is not None:  # the op routes [rows, E]
            logits = insert_call(graph, aten.reshape.default, (logits, [-1, fake(logits).shape[-1]]), origin=found.topk)
        weights, ids = insert_multi_output(
            graph,
            ops.topk_routing,
            (logits, found.k, found.scoring, found.renormalize, found.correction_bias, *found.group_args()),
            origin=found.topk,
        )
        if found.leading is not None:
            shape = [*found.leading, found.k]
            weights = insert_call(graph, aten.reshape.default, (weights, shape), origin=found.topk)
            ids = insert_call(graph, aten.reshape.default, (ids, shape), origin=found.topk)
        if found.weights is not None:
            replace_with(graph, found.weights, weights)
        if found.ids is not None:
            found.ids.replace_all_uses_with(ids)
    if found.dense is not None:
        # The weights scattered into zeros: what the sigmoid computed (sigmoid(-inf) = 0).
        with graph.inserting_before(found.dense.scatter):
            zeros = refill(graph, found.dense.fill, 0.0, weights)
            dense = insert_call(graph, aten.scatter.src, (zeros, -1, ids, weights), origin=found.dense.scatter)
            replace_with(graph, found.dense.sigmoid, dense)
    erase_unused(replaced)


def apply(graph: Graph, config: PassConfig) -> int:
    topks = [node for node in graph.nodes if is_call(node, aten.topk.default)]
    return rewrite_each(topks, lambda topk: match(topk, config), lambda found: replace(graph, found))
