"""allreduce_rmsnorm: all-reduce -> (+ residual) -> RMSNorm -> one fused op.

Before (each tensor-parallel block's output, and the vocab-parallel embedding)::

    r   = wait_tensor(all_reduce(partial, "sum", group))
    h   = r + residual                      # optional (absent after the embedding)
    t   = h.float()
    out = t * rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)   then * weight, in any of
          the forms below, cast back to h's dtype
    ... out feeds the next block, h is the next residual

After::

    out, h = fusion_passes.fused_allreduce_rmsnorm(partial, residual, weight, eps, group)

Why: at decode sizes the all-reduce is latency-bound and the add and the norm are
two more launches that re-read what the all-reduce just wrote; one kernel that reads
the peers' buffers, adds and normalises does it in one pass (docs/ops.md).

RMSNorm forms recognised (all computed in fp32 between an upcast and a downcast,
which are absent for fp32 models):
- ``F.rms_norm`` and gpt-oss: ``(t * rsqrt(mean(t**2) + eps) * weight).to(dtype)``
- Hugging Face Llama/Qwen: ``weight * (t * rsqrt(mean(t**2) + eps)).to(dtype)``
The op rounds once; the Hugging Face form rounds twice, so the two may differ by one
unit in the last place of the output dtype.

Structurally identical users of the all-reduce's result (the same op on the same
arguments, as ``h = norm(r + res); res = r + res`` writes the add twice) are merged
into one before matching.

Guard: a sum all-reduce whose result feeds nothing but the residual add (or, with no
add, the norm and the next residual); a constant eps; a 1-D weight of the hidden
size; the residual with the reduced tensor's shape and dtype.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, Node

from .. import ops
from ..config import PassConfig
from ._allreduce import AllReduce, find_allreduces
from ._graph import (
    after_inputs,
    arg,
    aten,
    convert_dtype,
    erase_unused,
    fake,
    insert_multi_output,
    is_call,
    merge_identical_users,
    reduces_last_dim,
    replace_with,
    rewrite_each,
    upstream,
)

NAME = "allreduce_rmsnorm"
# The op normalises in fp32 and rounds once to these.
NORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass
class Norm:
    output: Node
    weight: Node
    eps: float


@dataclasses.dataclass
class FusionMatch:
    allreduce: AllReduce
    residual: Node | None
    hidden: Node  # r + residual, or r: the next residual
    norm: Norm


def _other(node: Node, first: Node):
    """The other operand of a binary call whose one operand is ``first``."""
    a, b = node.args[:2]
    return b if a is first else a if b is first else None


def _only_user(node: Node, *targets) -> Node | None:
    if len(node.users) == 1:
        (user,) = node.users
        if is_call(user, *targets):
            return user
    return None


def _hidden_weight(node: Node, normalized: Node, hidden_size: int) -> Node | None:
    """The weight in ``node = normalized * weight`` (either order), a 1-D [H] tensor."""
    if not is_call(node, aten.mul.Tensor):
        return None
    weight = _other(node, normalized)
    value = fake(weight)
    if value is None or value.dim() != 1 or value.shape[0] != hidden_size:
        return None
    return weight


def rmsnorm_of(hidden: Node) -> Norm | None:
    """The RMSNorm computed over ``hidden``, if ``hidden`` feeds one."""
    hidden_value = fake(hidden)
    ndim, hidden_size = hidden_value.dim(), hidden_value.shape[-1]
    upcasts = [u for u in hidden.users if convert_dtype(u) == torch.float32]
    for t in upcasts + ([hidden] if hidden_value.dtype == torch.float32 else []):
        squares = [u for u in t.users if is_call(u, aten.pow.Tensor_Scalar) and u.args[0] is t and u.args[1] == 2]
        for square in squares:
            mean = _only_user(square, aten.mean.dim)
            if mean is None or not reduces_last_dim(mean.args[1], ndim) or not arg(mean, 2, "keepdim", False):
                continue
            shifted = _only_user(mean, aten.add.Tensor, aten.add.Scalar)
            if shifted is None or shifted.args[0] is not mean or not isinstance(shifted.args[1], (int, float)):
                continue  # eps must be a constant
            inverse_rms = _only_user(shifted, aten.rsqrt.default)
            normalized = inverse_rms and _only_user(inverse_rms, aten.mul.Tensor)
            if normalized is None or _other(normalized, inverse_rms) is not t:
                continue
            if t is not hidden and set(t.users) != {square, normalized}:
                continue
            norm = _weighted(normalized, hidden_value.dtype, hidden_size)
            if norm is not None:
                return Norm(norm[0], norm[1], float(shifted.args[1]))
    return None


def _weighted(normalized: Node, dtype: torch.dtype, hidden_size: int) -> tuple[Node, Node] | None:
    """(output, weight) for the weight multiply and cast back after the normalisation."""
    if len(normalized.users) != 1:
        return None
    (user,) = normalized.users
    weight = _hidden_weight(user, normalized, hidden_size)
    if weight is not None:  # weight applied in fp32, then the cast back (F.rms_norm, gpt-oss)
        cast = _only_user(user, torch.ops.prims.convert_element_type.default)
        return (cast if cast is not None and convert_dtype(cast) == dtype else user), weight
    if convert_dtype(user) == dtype and len(user.users) == 1:  # cast back, then weight (HF)
        (product,) = user.users
        weight = _hidden_weight(product, user, hidden_size)
        if weight is not None:
            return product, weight
    return None


def match(allreduce: AllReduce) -> FusionMatch | None:
    reduced = allreduce.output
    reduced_value = fake(reduced)
    if reduced_value is None or reduced_value.dim() < 1 or reduced_value.dtype not in NORM_DTYPES:
        return None
    norm = rmsnorm_of(reduced)
    if norm is not None:
        return FusionMatch(allreduce, None, reduced, norm)
    add = _only_user(reduced, aten.add.Tensor)
    if add is None or add.kwargs:
        return None
    residual = _other(add, reduced)
    residual_value = fake(residual)
    if residual_value is None or residual_value.shape != reduced_value.shape or residual_value.dtype != reduced_value.dtype:
        return None
    norm = rmsnorm_of(add)
    if norm is None:
        return None
    return FusionMatch(allreduce, residual, add, norm)


def replace(graph: Graph, found: FusionMatch) -> None:
    inputs = [found.allreduce.input, found.norm.weight] + ([found.residual] if found.residual is not None else [])
    replaced = upstream(found.norm.output, inputs) | upstream(found.hidden, inputs) | set(found.allreduce.parts())
    with graph.inserting_before(after_inputs(graph, inputs)):
        out, hidden = insert_multi_output(
            graph,
            ops.fused_allreduce_rmsnorm,
            (found.allreduce.input, found.residual, found.norm.weight, found.norm.eps, found.allreduce.group_name),
            origin=found.norm.output,
        )
        replace_with(graph, found.norm.output, out)
        replace_with(graph, found.hidden, hidden)
    erase_unused(replaced)


def apply(graph: Graph, config: PassConfig) -> int:
    allreduces = find_allreduces(graph, config)
    for allreduce in allreduces:
        # A sum written twice (h = norm(r + res); res = r + res) is one add to the pattern.
        merge_identical_users(allreduce.output)
    return rewrite_each(allreduces, match, lambda found: replace(graph, found))
