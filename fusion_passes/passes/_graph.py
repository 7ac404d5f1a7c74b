"""Graph helpers the passes share: recognising the forms ops take in Inductor's
post-grad graph, and inserting replacement nodes with their fake values.

The post-grad graph is ATen after Inductor's decompositions, so a softmax arrives
either as ``aten._softmax`` or decomposed (``amax, sub, exp, sum, div``, with a
``convert_element_type`` around it for low-precision inputs), ``t()`` arrives as
``permute(w, [1, 0])``, and the all-reduce as ``_c10d_functional.all_reduce`` +
``wait_tensor``. These helpers read those forms; they never rely on node names.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
from torch._guards import detect_fake_mode
from torch._inductor import inductor_prims
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

aten = torch.ops.aten
prims = torch.ops.prims

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Inductor's post-grad pass rewrites amax + sum of a softmax into this on GPUs.
PREPARE_SOFTMAX_ONLINE = inductor_prims.prepare_softmax_online


def is_call(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def fake(node) -> torch.Tensor | None:
    """The node's fake value (a FakeTensor), if it is a single tensor."""
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def known_equal(a, b) -> bool:
    """Sizes (or shapes) equal for every value their symbols can take. Never guards: a
    pass that compared a symbolic token count with ``==`` would specialize it."""
    return statically_known_true(sym_eq(a, b))


def arg(node: Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_last_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def reduces_last_dim(dims, ndim: int) -> bool:
    """``dims`` of a reduction (a list like [-1]) name exactly the last dim."""
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and is_last_dim(dims[0], ndim)


def getitem_users(node: Node) -> dict[int, Node]:
    """For a multi-output node: output index -> its getitem node."""
    return {user.args[1]: user for user in node.users if is_call(user, operator.getitem)}


def convert_dtype(node) -> torch.dtype | None:
    """The target dtype if ``node`` is a dtype conversion (prims or aten form)."""
    if is_call(node, prims.convert_element_type.default):
        return node.args[1]
    if is_call(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"} and len(node.args) == 1:
        return node.kwargs.get("dtype")
    return None


def strip_upcast(node: Node) -> Node:
    """``x`` for an exact upcast ``x.float()`` of a low-precision float, else ``node``."""
    if convert_dtype(node) == torch.float32:
        source = fake(node.args[0])
        if source is not None and source.dtype in LOW_PRECISION:
            return node.args[0]
    return node


def softmax_of(node: Node) -> Node | None:
    """If ``node`` is a softmax over the last dim, the tensor it is taken of.

    Recognises ``aten._softmax``, the decomposition
    ``div(exp(sub(x, amax(x, dim))), sum(exp(...), dim))``, and its online form on GPUs
    (``max, sum = prepare_softmax_online(x, dim)``; ``div(exp(sub(x, max)), sum)``). An exact upcast in front of
    the softmax is looked through, so the result may be lower precision than ``node``.
    """
    value = fake(node)
    if value is None or value.dim() == 0:
        return None
    ndim = value.dim()
    if is_call(node, aten._softmax.default) and is_last_dim(node.args[1], ndim):
        return strip_upcast(node.args[0])
    if not is_call(node, aten.div.Tensor):
        return None
    exp, total = node.args
    if not is_call(exp, aten.exp.default) or not is_call(exp.args[0], aten.sub.Tensor):
        return None
    source, row_max = exp.args[0].args
    if is_call(total, aten.sum.dim_IntList):
        # amax and sum as separate reductions (Inductor's CPU graphs)
        if total.args[0] is not exp or not reduces_last_dim(total.args[1], ndim) or not arg(total, 2, "keepdim", False):
            return None
        if not (is_call(row_max, aten.amax.default) and row_max.args[0] is source):
            return None
        if not reduces_last_dim(arg(row_max, 1, "dim"), ndim) or not arg(row_max, 2, "keepdim", False):
            return None
    elif is_call(total, operator.getitem) and is_call(row_max, operator.getitem):
        # max and sum from one online-softmax reduction (Inductor's GPU graphs)
        online = total.args[0]
        if not (is_call(online, PREPARE_SOFTMAX_ONLINE) and row_max.args[0] is online and online.args[0] is source):
            return None
        if (row_max.args[1], total.args[1]) != (0, 1) or not is_last_dim(online.args[1], ndim):
            return None
    else:
        return None
    return strip_upcast(source)


def renormalized(values: Node) -> tuple[Node, float] | None:
    """If the only use of ``values`` (probabilities, so never negative) is
    ``values / (total [+ eps])`` or ``values / total.clamp(min=eps)``, where ``total`` is
    their sum over the last dim (keepdim) or their 1-norm (``torch.norm(values, p=1, ...)``,
    DBRX: the sum, for values that are never negative), return (the division node, eps)."""
    users = list(values.users)
    divisions = [u for u in users if is_call(u, aten.div.Tensor) and u.args[0] is values]
    if len(divisions) != 1 or len(users) != 2:
        return None
    division = divisions[0]
    denominator, eps = division.args[1], 0.0
    guard = _sum_guard(denominator)
    if guard is not None:
        denominator, eps = guard
        if len(denominator.users) != 1:
            return None
    if not _is_row_sum(denominator, values):
        return None
    return division, eps


def _is_row_sum(total: Node, values: Node) -> bool:
    """``total`` is ``values.sum(-1, keepdim=True)``, or the 1-norm of ``values`` as the
    graph writes it (``linalg_vector_norm(values, 1, [-1], True)``, or Inductor's
    decomposition ``pow(sum(pow(abs(values), 1.0), [-1], True), 1.0)``), where every
    node between ``values`` and ``total`` has that one use."""
    ndim = fake(values).dim()
    total = _through_power_one(total)
    if is_call(total, aten.linalg_vector_norm.default):
        order, dims, keepdim = arg(total, 1, "ord", 2), arg(total, 2, "dim"), arg(total, 3, "keepdim", False)
        return total.args[0] is values and order == 1 and reduces_last_dim(dims, ndim) and keepdim
    if not is_call(total, aten.sum.dim_IntList) or not reduces_last_dim(total.args[1], ndim):
        return False
    if not arg(total, 2, "keepdim", False):
        return False
    summed = total.args[0]
    if summed is values:
        return True
    summed = _through_power_one(summed)
    return is_call(summed, aten.abs.default) and summed.args[0] is values and len(summed.users) == 1


def _through_power_one(node: Node) -> Node:
    """``x`` for ``x ** 1`` with one use (how a 1-norm's decomposition writes it), else ``node``."""
    if is_call(node, aten.pow.Tensor_Scalar) and node.args[1] == 1 and len(node.args[0].users) == 1:
        return node.args[0]
    return node


def _sum_guard(node: Node) -> tuple[Node, float] | None:
    """(total, eps) for ``total + eps`` or ``total.clamp(min=eps)`` with a constant eps."""
    if is_call(node, aten.add.Tensor, aten.add.Scalar) and isinstance(node.args[1], (int, float)):
        return node.args[0], float(node.args[1])
    if is_call(node, aten.clamp_min.default) and isinstance(node.args[1], (int, float)):
        return node.args[0], float(node.args[1])
    if is_call(node, aten.clamp.default) and arg(node, 2, "max") is None:
        low = arg(node, 1, "min")
        if isinstance(low, (int, float)):
            return node.args[0], float(low)
    return None


def is_pure(node) -> bool:
    """A call of an ATen/prims op that mutates nothing and draws no random numbers."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def merge_identical_users(node: Node) -> int:
    """Common-subexpression elimination over ``node``'s users: pure users with the same
    op and arguments become the earliest of them (e.g. ``h = norm(x + res); res = x + res``
    writes ``x + res`` twice). Returns how many nodes were merged away."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    first: dict = {}
    merged = 0
    for user in sorted(node.users, key=order.__getitem__):
        if not is_pure(user):
            continue
        try:
            key = (user.target, user.args, tuple(sorted(user.kwargs.items())))
            hash(key)
        except TypeError:  # an unhashable argument (a list of sizes): compare no further
            continue
        if key in first:
            user.replace_all_uses_with(first[key])
            node.graph.erase_node(user)
            merged += 1
        else:
            first[key] = user
    return merged


def evaluate_fake(target, args: Sequence, kwargs: dict | None = None):
    """Run ``target`` on the fake values of node arguments to get the new node's value."""
    kwargs = kwargs or {}
    flat = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Node)]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in flat])

    def to_value(a):
        return a.meta["val"] if isinstance(a, Node) else a

    with fake_mode:
        return target(*[to_value(a) for a in args], **{k: to_value(v) for k, v in kwargs.items()})


def insert_call(graph: Graph, target, args: Sequence, kwargs: dict | None = None, origin: Node | None = None) -> Node:
    """Insert ``target(*args)`` at the graph's current insertion point, with meta['val'],
    and the source location of ``origin`` (the node it replaces) for dumps and profiles."""
    node = graph.call_function(target, tuple(args), kwargs or {})
    node.meta["val"] = evaluate_fake(target, args, kwargs)
    if origin is not None and "stack_trace" in origin.meta:
        node.meta["stack_trace"] = origin.meta["stack_trace"]
    return node


def insert_multi_output(
    graph: Graph, target, args: Sequence, kwargs: dict | None = None, origin: Node | None = None
) -> list[Node]:
    """Insert a call of an op with several outputs and one getitem per output."""
    call = insert_call(graph, target, args, kwargs, origin)
    outputs = []
    for index, value in enumerate(call.meta["val"]):
        item = graph.call_function(operator.getitem, (call, index))
        item.meta["val"] = value
        if "stack_trace" in call.meta:
            item.meta["stack_trace"] = call.meta["stack_trace"]
        outputs.append(item)
    return outputs


def after_inputs(graph: Graph, inputs: Iterable[Node]) -> Node:
    """The node to insert before so that a new node comes right after the latest of
    ``inputs`` (and after every placeholder)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    latest = max(inputs, key=order.__getitem__)
    node = latest.next
    while node.op == "placeholder":
        node = node.next
    return node


def full_value(node) -> float | None:
    """The constant that a ``full`` / ``full_like`` node fills its tensor with."""
    if is_call(node, aten.full.default, aten.full_like.default) and isinstance(node.args[1], (int, float)):
        return float(node.args[1])
    return None


def refill(graph: Graph, full: Node, value: float, like: Node) -> Node:
    """A copy of the ``full`` / ``full_like`` node ``full`` (same size, device, layout)
    filled with ``value`` in ``like``'s dtype, at the current insertion point."""
    dtype = fake(like).dtype
    node = graph.call_function(full.target, (full.args[0], value, *full.args[2:]), {**full.kwargs, "dtype": dtype})
    with fake(full).fake_mode:
        node.meta["val"] = torch.full_like(fake(full), value, dtype=dtype)
    if "stack_trace" in full.meta:
        node.meta["stack_trace"] = full.meta["stack_trace"]
    return node


def cast_to(graph: Graph, node: Node, dtype: torch.dtype) -> Node:
    """``node`` converted to ``dtype`` (no node when it already has it)."""
    if fake(node).dtype == dtype:
        return node
    return insert_call(graph, prims.convert_element_type.default, (node, dtype), origin=node)


def replace_with(graph: Graph, old: Node, new: Node) -> None:
    """Route every use of ``old`` to ``new``, casting to ``old``'s dtype if they differ.
    Must be called with the insertion point before ``old``'s first user."""
    old.replace_all_uses_with(cast_to(graph, new, fake(old).dtype))


def erase_unused(nodes: Iterable[Node]) -> None:
    """Erase the given nodes that are left without users, latest first, repeatedly,
    so a replaced chain disappears whole while anything still used stays."""
    pending = set(nodes)
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if not node.users and node.graph is not None:
                node.graph.erase_node(node)
                pending.discard(node)
                changed = True


def upstream(node: Node, stop: Iterable[Node]) -> set[Node]:
    """``node`` and every node it depends on, not crossing ``stop`` nodes: the chain a
    replacement makes dead (erase_unused keeps whatever still has other users)."""
    stop, seen, todo = set(stop), set(), [node]
    while todo:
        current = todo.pop()
        if current in seen or current in stop or not isinstance(current, Node) or current.op != "call_function":
            continue
        seen.add(current)
        todo.extend(current.all_input_nodes)
    return seen


def rewrite_each(candidates: Iterable, match, replace) -> int:
    """Rewrite every candidate that ``match`` accepts (``replace(match(c))``); returns how
    many. Nodes an earlier rewrite erased are skipped."""
    count = 0
    for candidate in candidates:
        if getattr(candidate, "_erased", False):
            continue
        found = match(candidate)
        if found is not None:
            replace(found)
            count += 1
    return count
