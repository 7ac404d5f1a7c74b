"""Recognising group-limited expert selection (DeepSeek-V3's routing) for nan_safe_routing.

The computation, as Hugging Face and serving engines write it::

    s            = scores [+ e_score_correction_bias]                   # [T, E] selection score
    group_scores = s.view(T, G, E // G).topk(2, -1)[0].sum(-1)          # or .max(-1) / amax
    group_idx    = topk(group_scores, topk_group, sorted=False)[1]      # [T, topk_group]
    mask         = zeros_like(group_scores).scatter(1, group_idx, 1)    # or a one-hot, or eq/iota
                   .unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
    masked       = s.masked_fill(~mask.bool(), -inf)                    # or where(...), or 0.0
    ids          = topk(masked, k, sorted=False)[1]

Every Inductor version writes the mask differently (``scatter`` survives on some, a
one-hot ``eq(ids, iota)`` + ``where`` on others) and so do the models, so the two small
subgraphs are not matched node by node: they are *evaluated*. The subgraph from
``s`` to the group scores and the one from (``s``, ``group_idx``) to ``masked`` must
consist of pure ATen/prims ops and read nothing else; run on random concrete inputs,
they must compute exactly the top-2 sum (or max) per group and the masked scores.
"""

from __future__ import annotations

import dataclasses

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx import Node

from ._graph import arg, aten, fake, getitem_users, is_call, is_last_dim, is_pure, known_equal

# The mask and group-score subgraphs are a handful of ops; a walk that grows past this
# has left them (e.g. it reached back into the model) and is not this pattern.
MAX_SUBGRAPH_NODES = 48
# Ops from the selection score to the group top-k: view, topk/max (+ getitem), sum, topk.
MAX_GROUP_TOPK_DEPTH = 8
TRIALS = 3


@dataclasses.dataclass
class GroupLimited:
    scores: Node  # the [T, E] selection score before the groups mask it
    group_topk: Node
    n_group: int
    topk_group: int
    group_score: str  # "top2_sum" or "max"
    fill: float  # what the mask writes into dropped groups' experts: -inf or 0.0


def _size_hint(value):
    """The example value a symbolic size had when the graph was traced."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return int(hint) if hint is not None else int(value.node.shape_env.size_hint(value.node.expr))
    return value


def _is_size(node: Node) -> bool:
    return isinstance(node.meta.get("val"), (int, torch.SymInt))


def _subgraph(output: Node, inputs: set[Node]) -> list[Node] | None:
    """The nodes computing ``output`` from ``inputs`` (and sizes, constants), in graph
    order; None if the computation reads anything else or uses an impure op."""
    seen, todo = set(), [output]
    while todo:
        node = todo.pop()
        if node in seen or node in inputs:
            continue
        if not is_pure(node) or len(seen) >= MAX_SUBGRAPH_NODES:
            return None
        seen.add(node)
        for source in node.all_input_nodes:
            if source not in inputs and not _is_size(source):
                todo.append(source)
    if not inputs <= {source for node in seen for source in node.all_input_nodes} | {output}:
        return None
    order = {node: i for i, node in enumerate(output.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _evaluate(nodes: list[Node], output: Node, values: dict[Node, torch.Tensor]) -> torch.Tensor | None:
    env = dict(values)

    def concrete(a):
        if isinstance(a, Node):
            return env[a] if a in env else _size_hint(a.meta["val"])
        if isinstance(a, (list, tuple)):
            return type(a)(concrete(b) for b in a)
        return _size_hint(a)

    try:
        for node in nodes:
            env[node] = node.target(*concrete(node.args), **{k: concrete(v) for k, v in node.kwargs.items()})
    except Exception:  # an op that these inputs cannot run: not the pattern
        return None
    result = env.get(output)
    return result if isinstance(result, torch.Tensor) else None


def _same(got: torch.Tensor | None, expected: torch.Tensor) -> bool:
    return got is not None and got.shape == expected.shape and torch.equal(got, expected)


def _random_like(node: Node, generator: torch.Generator) -> torch.Tensor:
    value = fake(node)
    shape = [_size_hint(d) for d in value.shape]
    # Distinct values, so that every top-k is unambiguous.
    ranks = torch.randperm(shape[0] * shape[1], generator=generator).view(shape).to(torch.float64)
    return ((ranks - ranks.numel() / 2) / ranks.numel()).to(value.dtype).to(value.device)


def _group_scores_form(group_input: Node, scores: Node, n_group: int) -> str | None:
    nodes = _subgraph(group_input, {scores})
    if nodes is None:
        return None
    generator = torch.Generator().manual_seed(0)
    forms = {"top2_sum", "max"}
    for _ in range(TRIALS):
        s = _random_like(scores, generator)
        got = _evaluate(nodes, group_input, {scores: s})
        grouped = s.view(s.shape[0], n_group, -1)
        expected = {"max": grouped.amax(-1)}
        if grouped.shape[-1] >= 2:
            expected["top2_sum"] = grouped.topk(2, dim=-1).values.sum(-1)
        forms = {f for f in forms if f in expected and _same(got, expected[f])}
    if not forms:
        return None
    return "top2_sum" if "top2_sum" in forms else "max"


def _mask_fill(masked: Node, scores: Node, group_ids: Node, n_group: int, topk_group: int) -> float | None:
    nodes = _subgraph(masked, {scores, group_ids})
    if nodes is None:
        return None
    generator = torch.Generator().manual_seed(1)
    fills = {float("-inf"), 0.0}
    for _ in range(TRIALS):
        s = _random_like(scores, generator)
        rows = s.shape[0]
        ids = torch.stack([torch.randperm(n_group, generator=generator)[:topk_group] for _ in range(rows)])
        ids = ids.to(fake(group_ids).device)
        got = _evaluate(nodes, masked, {scores: s, group_ids: ids})
        kept = torch.zeros(rows, n_group, dtype=torch.bool, device=ids.device).scatter(1, ids, True)
        kept = kept.repeat_interleave(s.shape[1] // n_group, dim=1)
        fills = {f for f in fills if _same(got, s.masked_fill(~kept, f))}
    return min(fills) if fills else None


def group_limited(masked: Node) -> GroupLimited | None:
    """The group-limited selection whose masked scores ``masked`` [T, E] is, if it is one."""
    value = fake(masked)
    if value is None or value.dim() != 2 or not isinstance(value.shape[1], int):
        return None
    num_experts = value.shape[1]
    for scores in dict.fromkeys(a for a in masked.all_input_nodes if _has_shape_of(a, value)):
        for group_topk in _group_topks(scores, value.shape[0]):
            n_group, topk_group = fake(group_topk.args[0]).shape[1], group_topk.args[1]
            if not isinstance(n_group, int) or not isinstance(topk_group, int) or num_experts % n_group:
                continue
            with unset_fake_temporarily():  # concrete tensors, even inside a compile's fake mode
                group_score = _group_scores_form(group_topk.args[0], scores, n_group)
                fill = group_score and _mask_fill(masked, scores, getitem_users(group_topk)[1], n_group, topk_group)
            if fill is None or group_score is None:
                continue
            return GroupLimited(scores, group_topk, n_group, topk_group, group_score, fill)
    return None


def _has_shape_of(node: Node, value: torch.Tensor) -> bool:
    other = fake(node)
    return other is not None and other.dtype == value.dtype and known_equal(other.shape, value.shape)


def _group_topks(scores: Node, num_rows) -> list[Node]:
    """Top-ks over the last dim of a [T, G] tensor computed from ``scores`` within the
    group-score subgraph, whose ids are used and whose values are not. Breadth first, a
    few ops deep: ``scores`` also feeds the masked selection and, through it, the whole
    expert computation, which a depth-first walk would wander into first."""
    found, seen, frontier = [], set(), [scores]
    for _ in range(MAX_GROUP_TOPK_DEPTH):
        next_frontier = []
        for node in frontier:
            for user in node.users:
                if user in seen or not is_pure(user):
                    continue
                seen.add(user)
                if is_call(user, aten.topk.default) and user.args[0] is not scores:
                    group_scores = fake(user.args[0])
                    outputs = getitem_users(user)
                    if (
                        group_scores is not None
                        and group_scores.dim() == 2
                        and known_equal(group_scores.shape[0], num_rows)
                        and is_last_dim(arg(user, 2, "dim", -1), 2)
                        and arg(user, 3, "largest", True)
                        and set(outputs) == {1}
                    ):
                        found.append(user)
                        continue
                next_frontier.append(user)
        frontier = next_frontier
    return found
