"""The ops the passes insert: schemas, reference semantics, fake implementations.

Everything about an op's meaning lives here. The reference implementations are
plain torch, run on CPU and GPU, and *define* the semantics: the CUDA kernels in
``csrc/`` are tested against them. The CUDA kernels register themselves for the
CUDA dispatch key when the extension is loaded (``fusion_passes.kernels``), which
takes precedence over the references registered here for
``CompositeExplicitAutograd``. Until then a CUDA tensor runs the reference, with a
one-time warning.

    router_gemm(x, weight, bias=None, out_dtype=None) -> Tensor
    topk_routing(logits, k, scoring="softmax", renormalize=True,
                 correction_bias=None, n_group=1, topk_group=1,
                 group_score="top2_sum") -> (weights, ids)
    router_routing(x, weight, bias, k, <topk_routing's arguments>,
                   logits_dtype=None) -> (weights, ids)
    fused_allreduce_rmsnorm(x, residual, weight, eps, group_name)
        -> (out, residual_out)
"""

from __future__ import annotations

import functools
import warnings

import torch

NAMESPACE = "fusion_passes"

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(
    "router_gemm(Tensor x, Tensor weight, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor"
)
_lib.define(
    "topk_routing(Tensor logits, int k, str scoring=\"softmax\", bool renormalize=True, "
    "Tensor? correction_bias=None, int n_group=1, int topk_group=1, str group_score=\"top2_sum\") "
    "-> (Tensor weights, Tensor ids)"
)
_lib.define(
    "fused_allreduce_rmsnorm(Tensor x, Tensor? residual, Tensor weight, float eps, "
    "str group_name) -> (Tensor out, Tensor residual_out)"
)

ROUTER_GEMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")


# --------------------------------------------------------------------------- checks
# Shared by the reference, the fake implementation and (through the same messages)
# the CUDA kernels, so that bad input gets the same clear error everywhere.


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_router_gemm_args(x, weight, bias, out_dtype) -> None:
    _check(x.dim() == 2, f"router_gemm: x must be 2-D [T, H], got shape {tuple(x.shape)}")
    _check(weight.dim() == 2, f"router_gemm: weight must be 2-D [E, H], got shape {tuple(weight.shape)}")
    _check(
        x.shape[1] == weight.shape[1],
        f"router_gemm: hidden sizes differ: x is {tuple(x.shape)}, weight is {tuple(weight.shape)}",
    )
    _check(x.dtype in ROUTER_GEMM_DTYPES, f"router_gemm: x dtype {x.dtype} is not one of {ROUTER_GEMM_DTYPES}")
    _check(weight.dtype == x.dtype, f"router_gemm: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        _check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            f"router_gemm: bias must be [E]={weight.shape[0]}, got shape {tuple(bias.shape)}",
        )
        _check(bias.dtype == x.dtype, f"router_gemm: bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        _check(bias.device == x.device, "router_gemm: bias is on another device than x")
    _check(weight.device == x.device, "router_gemm: weight is on another device than x")
    _check(
        out_dtype is None or out_dtype in ROUTER_GEMM_DTYPES,
        f"router_gemm: out_dtype {out_dtype} is not one of {ROUTER_GEMM_DTYPES}",
    )


def check_topk_routing_args(
    logits, k, scoring, correction_bias, n_group=1, topk_group=1, group_score="top2_sum"
) -> None:
    _check(logits.dim() == 2, f"topk_routing: logits must be 2-D [T, E], got shape {tuple(logits.shape)}")
    _check(logits.dtype.is_floating_point, f"topk_routing: logits must be floating point, got {logits.dtype}")
    num_experts = logits.shape[1]
    _check(num_experts >= 1, "topk_routing: logits must have at least one expert column")
    _check(1 <= k <= num_experts, f"topk_routing: need 1 <= k <= E, got k={k}, E={num_experts}")
    _check(scoring in SCORINGS, f"topk_routing: scoring must be one of {SCORINGS}, got {scoring!r}")
    if correction_bias is not None:
        _check(
            correction_bias.dim() == 1 and correction_bias.shape[0] == num_experts,
            f"topk_routing: correction_bias must be [E]={num_experts}, got shape {tuple(correction_bias.shape)}",
        )
        _check(
            correction_bias.dtype.is_floating_point,
            f"topk_routing: correction_bias must be floating point, got {correction_bias.dtype}",
        )
        _check(correction_bias.device == logits.device, "topk_routing: correction_bias is on another device than logits")
    _check(n_group >= 1, f"topk_routing: n_group must be >= 1, got n_group={n_group}")
    _check(
        num_experts % n_group == 0,
        f"topk_routing: E must be divisible by n_group, got E={num_experts}, n_group={n_group}",
    )
    _check(
        1 <= topk_group <= n_group,
        f"topk_routing: need 1 <= topk_group <= n_group, got topk_group={topk_group}, n_group={n_group}",
    )
    kept_experts = topk_group * (num_experts // n_group)
    _check(
        k <= kept_experts,
        f"topk_routing: need k <= topk_group * E / n_group, got k={k}, topk_group={topk_group}, "
        f"E={num_experts}, n_group={n_group}",
    )
    _check(
        group_score in GROUP_SCORES,
        f"topk_routing: group_score must be one of {GROUP_SCORES}, got {group_score!r}",
    )


def check_fused_allreduce_rmsnorm_args(x, residual, weight) -> None:
    _check(x.dim() >= 1 and x.dtype.is_floating_point, f"fused_allreduce_rmsnorm: x must be floating point, got {x.dtype}")
    hidden = x.shape[-1]
    _check(
        weight.dim() == 1 and weight.shape[0] == hidden,
        f"fused_allreduce_rmsnorm: weight must be [H]={hidden}, got shape {tuple(weight.shape)}",
    )
    if residual is not None:
        _check(
            residual.shape == x.shape and residual.dtype == x.dtype,
            f"fused_allreduce_rmsnorm: residual {tuple(residual.shape)} {residual.dtype} "
            f"must match x {tuple(x.shape)} {x.dtype}",
        )


# ----------------------------------------------------------------------- references


@functools.cache
def _warn_reference_on_cuda(op: str) -> None:
    warnings.warn(
        f"fusion_passes::{op} is running its plain-torch reference on a CUDA tensor because the "
        "CUDA kernels are not loaded (see `fusion-passes build`); results are correct but slow.",
        stacklevel=3,
    )


def _cuda_kernel_loaded(op: str, t: torch.Tensor) -> bool:
    """For a CUDA tensor, load the kernels once (building them if needed); say whether
    the op now has a CUDA kernel to redispatch to."""
    if t.device.type != "cuda":
        return False
    from . import kernels

    if kernels.load() and kernels.has_cuda_kernel(op):
        return True
    _warn_reference_on_cuda(op)
    return False


def router_gemm_reference(x, weight, bias=None, out_dtype=None):
    """out[t] = (x[t] . weight^T + bias) in fp32, rounded once to out_dtype (or x's dtype)."""
    check_router_gemm_args(x, weight, bias, out_dtype)
    if _cuda_kernel_loaded("router_gemm", x):
        return torch.ops.fusion_passes.router_gemm(x, weight, bias, out_dtype)
    acc = torch.matmul(x.float(), weight.float().t())
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype or x.dtype)


def _clamp_infinities(t: torch.Tensor) -> torch.Tensor:
    """fp32 copy with +-Inf clamped to the largest/smallest finite float; NaN kept."""
    t = t.float()
    finfo = torch.finfo(torch.float32)
    return torch.where(torch.isinf(t), torch.where(t > 0, finfo.max, finfo.min), t)


def topk_routing_reference(
    logits, k, scoring="softmax", renormalize=True, correction_bias=None, n_group=1, topk_group=1, group_score="top2_sum"
):
    """NaN-safe top-k routing, optionally group-limited. The semantics, exactly:

    1. x = logits in fp32, +-Inf clamped to +-FLT_MAX. An entry is *valid* when x is not NaN.
    2. p: softmax over the valid entries of the row (invalid entries get p = 0), or
       sigmoid(x) for valid entries (invalid get 0).
    3. Selection score: without a correction bias, x itself (softmax and sigmoid are
       monotonic, so this orders exactly like p, and rounding never invents ties);
       with one, p + bias (bias clamped like x). A NaN selection score is invalid.
    4. Groups (n_group > 1): the E experts form n_group groups of E/n_group contiguous
       experts. A group's score, in fp32, is the sum of its two highest *group terms*
       (group_score="top2_sum"; a group of one expert: its only one) or its highest ("max").
       A valid entry's term is its selection score, except for "top2_sum" without a bias,
       where the groups are ranked by probabilities: the term is sigmoid(x) (p itself), or
       for softmax p's numerator u = exp(t) with t = x - m in fp32, m the row's largest
       valid x, and u = 0 where t < -87. (Dividing by the row's sum would not change the
       order of the u, and the score stays free of the sum's rounding; exp(-87) ~ 1.6e-38
       is still a normal float, so a kernel that flushes subnormal results gets the same
       terms.) An invalid entry's term is -FLT_MAX, so a group score is never NaN: a group
       with an invalid entry among its best two scores about -FLT_MAX, an all-invalid
       group -Inf (with probability terms, in [0, 1], every other group ranks above both).
       The topk_group best groups are kept, ties to the lower group index; only their
       experts are candidates below. n_group=1 keeps every expert.
    5. ids: the k best candidates, valid ones first by descending selection score, ties to
       the lower index; then invalid ones by index. So every row gets k distinct ids.
    6. weights = p[ids] (fp32). With renormalize, divided by their sum, added left to right
       in rank order in fp32 (a defined order, so that a kernel can reproduce it); a zero sum
       (e.g. an all-NaN row) gives 1/k each.
    """
    check_topk_routing_args(logits, k, scoring, correction_bias, n_group, topk_group, group_score)
    if _cuda_kernel_loaded("topk_routing", logits):
        return torch.ops.fusion_passes.topk_routing(
            logits, k, scoring, renormalize, correction_bias, n_group, topk_group, group_score
        )
    return topk_routing_in_torch(logits, k, scoring, renormalize, correction_bias, n_group, topk_group, group_score)


def topk_routing_in_torch(
    logits, k, scoring="softmax", renormalize=True, correction_bias=None, n_group=1, topk_group=1, group_score="top2_sum"
):
    """The computation of `topk_routing_reference` in plain torch on the tensors' own device,
    never redispatched to the kernel (arguments already checked): the CUDA tests compare the
    kernel with it on the same GPU tensors."""
    x = _clamp_infinities(logits)
    valid = ~torch.isnan(x)
    if scoring == "softmax":
        masked = x.masked_fill(~valid, float("-inf"))
        row_max = masked.amax(dim=-1, keepdim=True).masked_fill(~valid.any(-1, keepdim=True), 0.0)
        shifted = masked - row_max
        unnormalized = torch.exp(shifted)  # exp(-inf) = 0 for invalid entries
        p = unnormalized / unnormalized.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    else:
        p = torch.sigmoid(x).masked_fill(~valid, 0.0)
    if correction_bias is None:
        score = x
    else:
        score = _clamp_infinities(p + _clamp_infinities(correction_bias))
        valid = valid & ~torch.isnan(score)
    # Stable descending sort on a key where invalid entries sit below every valid one.
    key = score.masked_fill(~valid, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    # Invalid entries all carry -inf, so the stable sort keeps them in index order too.
    if n_group > 1:
        if correction_bias is not None or group_score == "max":
            group_terms = score
        elif scoring == "softmax":
            group_terms = torch.where(shifted < _SOFTMAX_GROUP_TERM_FLOOR, 0.0, unnormalized)
        else:
            group_terms = p
        kept = _kept_experts(group_terms, valid, n_group, topk_group, group_score)
        # A second stable sort moves the experts of dropped groups behind every kept one and
        # keeps the order above among the kept ones.
        dropped = (~kept.gather(1, order)).to(torch.uint8)
        order = order.gather(1, torch.sort(dropped, dim=-1, stable=True).indices)
    ids = order[:, :k].contiguous()
    weights = p.gather(1, ids)
    if renormalize:
        total = weights[:, :1]
        for rank in range(1, k):
            total = total + weights[:, rank : rank + 1]
        weights = torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), 1.0 / k)
    return weights, ids


# Step 4: a softmax group term u = exp(t) counts as 0 where t < this (exp(-87) is normal).
_SOFTMAX_GROUP_TERM_FLOOR = -87.0


def _kept_experts(group_terms, valid, n_group, topk_group, group_score):
    """[T, E] bool: the experts of each row's topk_group best groups (step 4 above)."""
    num_rows, num_experts = group_terms.shape
    finfo = torch.finfo(torch.float32)
    grouped = group_terms.masked_fill(~valid, finfo.min).view(num_rows, n_group, num_experts // n_group)
    if group_score == "max" or grouped.shape[-1] == 1:
        group_scores = grouped.amax(dim=-1)
    else:
        top2 = torch.topk(grouped, 2, dim=-1).values  # fp32: a single rounding of the sum
        group_scores = top2[..., 0] + top2[..., 1]
    # Group scores are never NaN, so the stable sort's order is total: ties to the lower group.
    kept_groups = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    kept = torch.zeros(num_rows, n_group, dtype=torch.bool, device=group_terms.device)
    kept.scatter_(1, kept_groups, True)
    return kept.repeat_interleave(num_experts // n_group, dim=1)


def resolve_group_size(group_name: str) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name).size()


def fused_allreduce_rmsnorm_reference(x, residual, weight, eps, group_name):
    """r = sum of x over the group; h = r + residual (or r), in x's dtype;
    out = h * rsqrt(mean(h^2, -1) + eps) * weight in fp32, rounded once to x's dtype;
    returns (out, h). (CUDA tensors go to fusion_passes.fused_allreduce's implementation.)"""
    check_fused_allreduce_rmsnorm_args(x, residual, weight)
    return fused_allreduce_rmsnorm_composite(x, residual, weight, eps, group_name)


def fused_allreduce_rmsnorm_composite(x, residual, weight, eps, group_name):
    """The reference's arithmetic in ATen ops (the CUDA path runs it for what its kernels do
    not cover, e.g. float64)."""
    reduced = torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", group_name)
    )
    hidden = reduced if residual is None else reduced + residual
    return rmsnorm_reference(hidden, weight, eps), hidden


def rmsnorm_reference(hidden, weight, eps):
    """RMSNorm computed in fp32 with the weight applied in fp32, rounded once to hidden's dtype."""
    h = hidden.float()
    normed = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return normed.to(hidden.dtype)


_lib.impl("router_gemm", router_gemm_reference, "CompositeExplicitAutograd")
_lib.impl("topk_routing", topk_routing_reference, "CompositeExplicitAutograd")
_lib.impl("fused_allreduce_rmsnorm", fused_allreduce_rmsnorm_reference, "CompositeExplicitAutograd")


# ------------------------------------------------------------------------------ fakes


@torch.library.register_fake("fusion_passes::router_gemm")
def _router_gemm_fake(x, weight, bias=None, out_dtype=None):
    check_router_gemm_args(x, weight, bias, out_dtype)
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype or x.dtype)


@torch.library.register_fake("fusion_passes::topk_routing")
def _topk_routing_fake(
    logits, k, scoring="softmax", renormalize=True, correction_bias=None, n_group=1, topk_group=1, group_score="top2_sum"
):
    check_topk_routing_args(logits, k, scoring, correction_bias, n_group, topk_group, group_score)
    shape = (logits.shape[0], k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("fusion_passes::fused_allreduce_rmsnorm")
def _fused_allreduce_rmsnorm_fake(x, residual, weight, eps, group_name):
    check_fused_allreduce_rmsnorm_args(x, residual, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format
    )


router_gemm = torch.ops.fusion_passes.router_gemm.default
topk_routing = torch.ops.fusion_passes.topk_routing.default
fused_allreduce_rmsnorm = torch.ops.fusion_passes.fused_allreduce_rmsnorm.default


# ------------------------------------------------------------------- router_routing
# The router GEMM and the routing of its logits as one op: exactly
# topk_routing(router_gemm(x, weight, bias, logits_dtype), k, ...). Its CUDA implementation
# (csrc/router_routing.cu) runs one kernel at decode sizes (the logits pass through L2 only).

_lib.define(
    "router_routing(Tensor x, Tensor weight, Tensor? bias, int k, str scoring=\"softmax\", "
    "bool renormalize=True, Tensor? correction_bias=None, int n_group=1, int topk_group=1, "
    "str group_score=\"top2_sum\", ScalarType? logits_dtype=None) -> (Tensor weights, Tensor ids)"
)


def check_router_routing_args(
    x, weight, bias, k, scoring, correction_bias, n_group, topk_group, group_score, logits_dtype
) -> None:
    """The checks of the two ops it composes, with their messages."""
    check_router_gemm_args(x, weight, bias, logits_dtype)
    logits_like = x.new_empty((0, weight.shape[0]), dtype=logits_dtype or x.dtype)
    check_topk_routing_args(logits_like, k, scoring, correction_bias, n_group, topk_group, group_score)


def router_routing_reference(
    x,
    weight,
    bias,
    k,
    scoring="softmax",
    renormalize=True,
    correction_bias=None,
    n_group=1,
    topk_group=1,
    group_score="top2_sum",
    logits_dtype=None,
):
    """topk_routing(router_gemm(x, weight, bias, logits_dtype), k, ...): the logits are
    rounded once to logits_dtype (x's dtype when None) before routing. On a CUDA tensor
    without the fused kernel loaded, this is the two ops' kernels."""
    check_router_routing_args(x, weight, bias, k, scoring, correction_bias, n_group, topk_group, group_score, logits_dtype)
    logits = torch.ops.fusion_passes.router_gemm(x, weight, bias, logits_dtype)
    return torch.ops.fusion_passes.topk_routing(
        logits, k, scoring, renormalize, correction_bias, n_group, topk_group, group_score
    )


_lib.impl("router_routing", router_routing_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fusion_passes::router_routing")
def _router_routing_fake(
    x,
    weight,
    bias,
    k,
    scoring="softmax",
    renormalize=True,
    correction_bias=None,
    n_group=1,
    topk_group=1,
    group_score="top2_sum",
    logits_dtype=None,
):
    check_router_routing_args(x, weight, bias, k, scoring, correction_bias, n_group, topk_group, group_score, logits_dtype)
    shape = (x.shape[0], k)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int64)


router_routing = torch.ops.fusion_passes.router_routing.default
