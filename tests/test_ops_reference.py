"""The op contracts of docs/ops.md and the docstrings in
``fusion_passes/ops.py``, checked against the plain-torch references on CPU.

Every expectation here is computed independently of the package: in float64
(plain Python loops for the routing op) and rounded once to the dtype the
contract names. Nothing in this file calls the package's helpers except the ops
themselves (through ``torch.ops.fusion_passes``).
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import fusion_passes  # noqa: F401  (registers the ops)

router_gemm = torch.ops.fusion_passes.router_gemm.default
topk_routing = torch.ops.fusion_passes.topk_routing.default
fused_allreduce_rmsnorm = torch.ops.fusion_passes.fused_allreduce_rmsnorm.default

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FLT_MAX = torch.finfo(torch.float32).max
NAN = float("nan")
INF = float("inf")


# ------------------------------------------------------------------------ helpers


def dtype_id(dtype) -> str:
    return "x_dtype" if dtype is None else str(dtype).removeprefix("torch.")


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at the magnitude of ``values`` (float64), subnormals included.
    At an exact power of two this is the spacing above it (the larger one)."""
    finfo = torch.finfo(dtype)
    magnitude = values.double().abs().clamp_min(finfo.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * finfo.eps


def assert_within_ulps(got: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, ulps: float, slack=None):
    """``got`` (in ``dtype``) is at most ``ulps`` units in the last place of ``dtype`` away
    from ``expected64`` rounded to ``dtype`` (plus an optional absolute ``slack`` per
    element, for errors the contract allows before the final rounding)."""
    assert got.dtype == dtype, (got.dtype, dtype)
    assert got.shape == expected64.shape, (got.shape, expected64.shape)
    if got.numel() == 0:
        return
    rounded = expected64.to(dtype).double()
    allowed = ulps * ulp(rounded, dtype)
    if slack is not None:
        allowed = allowed + slack
    diff = (got.double() - rounded).abs()
    bad = diff > allowed
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {got.numel()} elements off by more than {ulps} ulp of {dtype}; "
            f"first at {i}: got {got[tuple(i)].item()!r}, float64 {expected64[tuple(i)].item()!r}, "
            f"rounded {rounded[tuple(i)].item()!r}, allowed {allowed[tuple(i)].item()!r}"
        )


def to_f32(v: float) -> float:
    """Round a Python float (float64) to the nearest float32 (ties to even)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(INF, v)


# ===================================================================== router_gemm


def router_gemm_float64(x, weight, bias):
    """x @ weight^T (+ bias), exactly enough: float64 has room for every product and
    partial sum of the inputs used here."""
    out = x.double() @ weight.double().t()
    if bias is not None:
        out = out + bias.double()
    return out


def grid_tensor(shape, dtype, generator, lo=-15, hi=15, scale=0.125):
    """Small integers times a power of two: exact in bf16/fp16/fp32, and every product
    and partial sum of a length-H dot product (H <= a few hundred) is exact in fp32,
    so fp32 accumulation makes no rounding error and the only rounding left is the
    one to the output dtype."""
    return (torch.randint(lo, hi + 1, shape, generator=generator).double() * scale).to(dtype)


def make_router_inputs(T, H, E, dtype, with_bias, layout, generator, grid=True):
    make = (lambda s: grid_tensor(s, dtype, generator)) if grid else (
        lambda s: torch.randn(s, generator=generator).to(dtype)
    )
    if layout == "transposed":
        x = make((H, T)).t()  # a [T, H] view with strides (1, T)
        assert not x.is_contiguous() or T <= 1
    else:
        x = make((T, H))
    weight = make((E, H))
    bias = make((E,)) if with_bias else None
    return x, weight, bias


class TestRouterGemmOpcheck:
    @pytest.mark.parametrize(
        "dtype,with_bias,out_dtype",
        [
            (torch.bfloat16, False, None),
            (torch.bfloat16, True, torch.float32),
            (torch.float16, True, None),
            (torch.float16, False, torch.float32),
            (torch.float32, True, None),
            (torch.float32, False, torch.bfloat16),
        ],
        ids=["bf16", "bf16-bias-out_fp32", "fp16-bias", "fp16-out_fp32", "fp32-bias", "fp32-out_bf16"],
    )
    def test_opcheck(self, dtype, with_bias, out_dtype):
        g = torch.Generator().manual_seed(0)
        x, weight, bias = make_router_inputs(5, 32, 8, dtype, with_bias, "contiguous", g, grid=False)
        torch.library.opcheck(router_gemm, (x, weight, bias), {"out_dtype": out_dtype})

    def test_opcheck_zero_tokens(self):
        x = torch.randn(0, 32, dtype=torch.bfloat16)
        weight = torch.randn(8, 32, dtype=torch.bfloat16)
        torch.library.opcheck(router_gemm, (x, weight, None), {"out_dtype": torch.float32})


class TestRouterGemmSemantics:
    """out = (x @ weight^T + bias) accumulated in fp32, rounded once to out_dtype (or x's)."""

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16], ids=dtype_id)
    @pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
    @pytest.mark.parametrize("T", [0, 1, 7])
    @pytest.mark.parametrize("layout", ["contiguous", "transposed"])
    def test_exact_fp32_sum_is_rounded_once_to_nearest(self, dtype, out_dtype, with_bias, T, layout):
        # Inputs on a grid where fp32 accumulation is exact: the result must then be the
        # float64 result rounded once, to nearest-even -- bitwise (well within 1 ulp). The
        # sums need up to ~15 significant bits, so rounding to bf16/fp16 does happen.
        g = torch.Generator().manual_seed(1000 * T + 7)
        H, E = 96, 12
        x, weight, bias = make_router_inputs(T, H, E, dtype, with_bias, layout, g)
        out = router_gemm(x, weight, bias, out_dtype)
        expected_dtype = out_dtype or dtype
        assert out.dtype == expected_dtype
        assert out.shape == (T, E)
        expected = router_gemm_float64(x, weight, bias)
        assert torch.equal(out, expected.to(expected_dtype)), "not the float64 result rounded once"
        assert_within_ulps(out, expected, expected_dtype, ulps=1)

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
    @pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
    def test_random_inputs_within_one_rounding_plus_fp32_accumulation(self, dtype, out_dtype, with_bias):
        # For general inputs fp32 accumulation itself rounds; its error is bounded by
        # gamma_n * sum|x_i w_i| (n = H + 1 additions, gamma_n ~ n * 2^-24). On top of
        # that the contract allows exactly one rounding to the output dtype: 1 ulp.
        g = torch.Generator().manual_seed(3)
        T, H, E = 9, 200, 16
        x, weight, bias = make_router_inputs(T, H, E, dtype, with_bias, "transposed", g, grid=False)
        out = router_gemm(x, weight, bias, out_dtype)
        expected = router_gemm_float64(x, weight, bias)
        magnitude = x.double().abs() @ weight.double().abs().t()
        if bias is not None:
            magnitude = magnitude + bias.double().abs()
        n = H + 1
        gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
        assert_within_ulps(out, expected, out_dtype or dtype, ulps=1, slack=gamma * magnitude)

    def test_no_double_rounding_through_input_dtype(self):
        # bf16 inputs, fp32 output: 1*1 + 2^-8 * 1 + 2^-16 * 1 is exact in fp32 but not in
        # bf16; a kernel that rounded to bf16 on the way would lose the low bits.
        x = torch.tensor([[1.0, 2.0**-8, 2.0**-16]], dtype=torch.bfloat16)
        weight = torch.ones(2, 3, dtype=torch.bfloat16)
        bias = torch.tensor([0.0, 2.0**-20], dtype=torch.bfloat16)
        out = router_gemm(x, weight, bias, torch.float32)
        assert out.tolist() == [[1 + 2.0**-8 + 2.0**-16, 1 + 2.0**-8 + 2.0**-16 + 2.0**-20]]

    def test_out_dtype_defaults_to_x_dtype(self):
        x = torch.ones(2, 4, dtype=torch.float16)
        assert router_gemm(x, torch.ones(3, 4, dtype=torch.float16)).dtype == torch.float16
        assert router_gemm(x, torch.ones(3, 4, dtype=torch.float16), None, torch.float32).dtype == torch.float32


ROUTER_BAD_INPUTS = {
    # name: (x, weight, bias, out_dtype, message regex)
    "mixed_dtypes": (
        lambda: (torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8), None, None),
        r"weight dtype torch\.float32 differs from x dtype torch\.bfloat16",
    ),
    "bias_dtype_differs": (
        lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, dtype=torch.float16), None),
        r"bias dtype .* differs from x dtype",
    ),
    "x_1d": (lambda: (torch.randn(8), torch.randn(4, 8), None, None), r"x must be 2-D \[T, H\]"),
    "x_3d": (lambda: (torch.randn(2, 3, 8), torch.randn(4, 8), None, None), r"x must be 2-D \[T, H\]"),
    "weight_1d": (lambda: (torch.randn(2, 8), torch.randn(8), None, None), r"weight must be 2-D \[E, H\]"),
    "weight_3d": (lambda: (torch.randn(2, 8), torch.randn(1, 4, 8), None, None), r"weight must be 2-D \[E, H\]"),
    "hidden_mismatch": (lambda: (torch.randn(2, 8), torch.randn(4, 9), None, None), r"hidden sizes differ"),
    "bias_wrong_length": (
        lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), None),
        r"bias must be \[E\]=4, got shape \(5,\)",
    ),
    "bias_2d": (
        lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(1, 4), None),
        r"bias must be \[E\]=4, got shape \(1, 4\)",
    ),
    "int_dtype": (
        lambda: (torch.ones(2, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32), None, None),
        r"x dtype torch\.int32 is not one of",
    ),
    "float64_dtype": (
        lambda: (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), None, None),
        r"x dtype torch\.float64 is not one of",
    ),
    "int_out_dtype": (lambda: (torch.randn(2, 8), torch.randn(4, 8), None, torch.int32), r"out_dtype torch\.int32"),
}


class TestRouterGemmBadInputs:
    @pytest.mark.parametrize("case", list(ROUTER_BAD_INPUTS))
    def test_value_error_names_the_problem(self, case):
        build, message = ROUTER_BAD_INPUTS[case]
        x, weight, bias, out_dtype = build()
        with pytest.raises(ValueError, match=r"router_gemm: " + message):
            router_gemm(x, weight, bias, out_dtype)

    @pytest.mark.parametrize("case", ["mixed_dtypes", "x_3d", "hidden_mismatch", "bias_wrong_length"])
    def test_fake_implementation_rejects_the_same_inputs(self, case):
        from torch._subclasses.fake_tensor import FakeTensorMode

        build, message = ROUTER_BAD_INPUTS[case]
        with FakeTensorMode():
            x, weight, bias, out_dtype = build()
            with pytest.raises(ValueError, match=message):
                router_gemm(x, weight, bias, out_dtype)


# ==================================================================== topk_routing


def _clamp(v: float) -> float:
    if v == INF:
        return FLT_MAX
    if v == -INF:
        return -FLT_MAX
    return v


def _sigmoid(v: float) -> float:
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def routing_float64(
    logits, k, scoring="softmax", renormalize=True, correction_bias=None, n_group=1, topk_group=1, group_score="top2_sum"
):
    """The contract, one row at a time, in float64 Python.

    x = logits in fp32 with +-Inf -> +-FLT_MAX; NaN entries are invalid. p is the softmax
    over valid entries (or sigmoid), 0 for invalid ones, and lives in fp32. The ids are
    the valid entries by descending selection score (x, or fp32(p + bias) with a
    correction bias; a NaN score is invalid), ties to the lower index, then the invalid
    entries by index. weights = p[ids], renormalized to sum 1 (1/k each if the sum is 0).
    With groups, only the experts of the topk_group best groups are ranked: a group scores
    fp32(top1 + top2) (or its top1; a one-expert group its only one) of its entries' terms,
    invalid ones counting -FLT_MAX; ties go to the lower group. A term is the selection
    score, except for "top2_sum" without a bias: the fp32 sigmoid p, or for softmax
    fp32(exp(t)) of t = fp32(x - max), 0 where t < -87.
    Returns (weights float64 [T, k], ids int64 [T, k]).
    """
    bias = None if correction_bias is None else [_clamp(b) for b in correction_bias.float().tolist()]
    all_weights, all_ids = [], []
    for row in logits.float().tolist():  # exact: every float dtype here widens exactly to fp32
        x = [_clamp(v) for v in row]
        valid = [not math.isnan(v) for v in x]
        E = len(x)
        if scoring == "softmax":
            if any(valid):
                top = max(v for v, ok in zip(x, valid) if ok)
                e = [math.exp(v - top) if ok else 0.0 for v, ok in zip(x, valid)]
                shifted = [to_f32(v - top) if ok else -INF for v, ok in zip(x, valid)]
                numerators = [0.0 if t < -87 else to_f32(math.exp(t)) for t in shifted]
                total = sum(e)
                p = [ei / total for ei in e]
            else:
                p = [0.0] * E
        else:
            p = [_sigmoid(v) if ok else 0.0 for v, ok in zip(x, valid)]
        p = [to_f32(pi) for pi in p]
        if bias is None:
            score = x
        else:
            score = [_clamp(to_f32(pi + bi)) for pi, bi in zip(p, bias)]
            valid = [ok and not math.isnan(s) for ok, s in zip(valid, score)]
        if bias is not None or group_score == "max":
            terms = score
        else:  # an all-invalid softmax row has no numerators, and needs no terms
            terms = numerators if scoring == "softmax" and any(valid) else p
        size = E // n_group
        group_scores = []
        for g in range(n_group):
            members = sorted((terms[i] if valid[i] else -FLT_MAX for i in range(g * size, (g + 1) * size)), reverse=True)
            group_scores.append(members[0] if group_score == "max" or size == 1 else to_f32(members[0] + members[1]))
        kept_groups = sorted(range(n_group), key=lambda g: (-group_scores[g], g))[:topk_group]
        candidates = [i for i in range(E) if i // size in kept_groups]
        ranked = sorted((i for i in candidates if valid[i]), key=lambda i: (-score[i], i))
        ranked += [i for i in candidates if not valid[i]]
        ids = ranked[:k]
        weights = [p[i] for i in ids]
        if renormalize:
            total = sum(weights)
            weights = [w / total for w in weights] if total > 0 else [1.0 / k] * k
        all_weights.append(weights)
        all_ids.append(ids)
    T = len(all_ids)
    return (
        torch.tensor(all_weights, dtype=torch.float64).reshape(T, k),
        torch.tensor(all_ids, dtype=torch.int64).reshape(T, k),
    )


def assert_routing_invariants(weights, ids, T, k, E, renormalize):
    """What docs/ops.md promises for every row, whatever the input."""
    assert weights.shape == (T, k) and ids.shape == (T, k), (weights.shape, ids.shape)
    assert weights.dtype == torch.float32, weights.dtype
    assert ids.dtype == torch.int64, ids.dtype
    if T == 0:
        return
    assert bool(((ids >= 0) & (ids < E)).all()), f"ids out of [0, {E}): {ids}"
    sorted_ids = ids.sort(dim=-1).values
    assert bool((sorted_ids[:, 1:] != sorted_ids[:, :-1]).all()), f"repeated ids in a row: {ids}"
    assert bool(torch.isfinite(weights).all()), f"non-finite weights: {weights}"
    assert bool((weights >= 0).all()), f"negative weights: {weights}"
    if renormalize:
        torch.testing.assert_close(weights.double().sum(-1), torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-5)


def check_routing(logits, k, scoring="softmax", renormalize=True, correction_bias=None, *group_args):
    weights, ids = topk_routing(logits, k, scoring, renormalize, correction_bias, *group_args)
    T, E = logits.shape
    assert_routing_invariants(weights, ids, T, k, E, renormalize)
    expected_weights, expected_ids = routing_float64(logits, k, scoring, renormalize, correction_bias, *group_args)
    assert ids.tolist() == expected_ids.tolist(), f"ids {ids.tolist()} != expected {expected_ids.tolist()}"
    # p is computed in fp32 (exp, a length-E sum, a division; then the renormalizing
    # division): a few fp32 roundings, so a relative tolerance of a few 1e-6.
    torch.testing.assert_close(weights.double(), expected_weights, rtol=1e-5, atol=1e-7)
    return weights, ids


class TestTopkRoutingOpcheck:
    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    @pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no_renorm"])
    @pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
    def test_opcheck(self, scoring, renormalize, with_bias):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(6, 8, generator=g)
        logits[1, 2] = NAN
        logits[2, 0] = INF
        bias = torch.randn(8, generator=g) if with_bias else None
        torch.library.opcheck(topk_routing, (logits, 3, scoring, renormalize, bias))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
    def test_opcheck_half_precision_logits(self, dtype):
        logits = torch.randn(4, 16).to(dtype)
        torch.library.opcheck(topk_routing, (logits, 4), {"correction_bias": torch.randn(16).to(dtype)})

    def test_opcheck_zero_tokens(self):
        torch.library.opcheck(topk_routing, (torch.randn(0, 8), 2))


class TestTopkRoutingAgainstFloat64:
    """Random logits, every configuration, compared with the float64 hand computation."""

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    @pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no_renorm"])
    @pytest.mark.parametrize("k", [1, 3, 8])
    def test_random_logits(self, dtype, scoring, renormalize, k):
        g = torch.Generator().manual_seed(17 + k)
        logits = (3 * torch.randn(11, 8, generator=g)).to(dtype)
        check_routing(logits, k, scoring, renormalize)

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no_renorm"])
    @pytest.mark.parametrize("k", [1, 2, 6])
    def test_sigmoid_with_correction_bias_selects_by_p_plus_bias_weights_are_p(self, dtype, renormalize, k):
        g = torch.Generator().manual_seed(5 + k)
        logits = torch.randn(13, 6, generator=g).to(dtype)
        bias = (0.5 * torch.randn(6, generator=g)).to(dtype)
        weights, ids = check_routing(logits, k, "sigmoid", renormalize, bias)
        # The bias must actually change the choice somewhere, or this test shows nothing.
        _, ids_without_bias = topk_routing(logits, k, "sigmoid", renormalize, None)
        if k < 6:
            assert not torch.equal(ids, ids_without_bias)
        if not renormalize:
            p = torch.sigmoid(logits.double()).gather(1, ids)
            torch.testing.assert_close(weights.double(), p, rtol=1e-6, atol=0)

    def test_softmax_equals_sorted_softmax_topk(self):
        # Without NaN/Inf or ties the op is the familiar softmax -> topk -> renormalize.
        g = torch.Generator().manual_seed(9)
        logits = torch.randn(32, 64, generator=g)
        weights, ids = topk_routing(logits, 4, "softmax", True, None)
        p = torch.softmax(logits.double(), dim=-1)
        top_p, top_ids = p.topk(4, dim=-1)
        assert torch.equal(ids, top_ids)
        torch.testing.assert_close(weights.double(), top_p / top_p.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)
        # ... and the gpt-oss form, topk -> softmax over the k chosen logits, is the same.
        top_logits, _ = logits.double().topk(4, dim=-1)
        torch.testing.assert_close(weights.double(), torch.softmax(top_logits, -1), rtol=1e-5, atol=1e-7)

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_renormalization_adds_the_weights_left_to_right_in_rank_order(self, scoring):
        # A defined order (the CUDA kernel reproduces it bit for bit): w / (((w0 + w1) + w2) + ...)
        # in fp32, where w are the weights without renormalization, in rank order.
        g = torch.Generator().manual_seed(11)
        logits = torch.randn(256, 64, generator=g) * 3
        k = 8
        weights, ids = topk_routing(logits, k, scoring, True, None)
        raw, raw_ids = topk_routing(logits, k, scoring, False, None)
        assert torch.equal(ids, raw_ids)
        total = raw[:, 0]
        for rank in range(1, k):
            total = total + raw[:, rank]
        assert torch.equal(weights, raw / total.unsqueeze(1))

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_zero_tokens(self, scoring):
        weights, ids = topk_routing(torch.randn(0, 8), 2, scoring, True, None)
        assert_routing_invariants(weights, ids, 0, 2, 8, True)


def row(*values, dtype=torch.float32):
    return torch.tensor([list(values)], dtype=dtype)


class TestTopkRoutingSpecialValues:
    """The NaN-safety and tie rules, as literal examples derived from the contract."""

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_all_equal_logits_pick_lowest_indices(self, scoring):
        weights, ids = check_routing(torch.full((3, 6), 0.25), 4, scoring)
        assert ids.tolist() == [[0, 1, 2, 3]] * 3
        assert weights.tolist() == [[0.25] * 4] * 3

    def test_all_equal_logits_without_renormalize_give_p(self):
        weights, ids = check_routing(torch.zeros(1, 4), 2, "softmax", renormalize=False)
        assert ids.tolist() == [[0, 1]] and weights.tolist() == [[0.25, 0.25]]
        weights, ids = check_routing(torch.zeros(1, 4), 2, "sigmoid", renormalize=False)
        assert ids.tolist() == [[0, 1]] and weights.tolist() == [[0.5, 0.5]]

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_partial_ties_go_to_lower_index(self, scoring):
        _, ids = check_routing(row(0.0, 2.0, 1.0, 2.0, 1.0), 4, scoring)
        assert ids.tolist() == [[1, 3, 2, 4]]

    def test_k_equals_one_is_argmax(self):
        g = torch.Generator().manual_seed(2)
        logits = torch.randn(20, 10, generator=g)
        weights, ids = check_routing(logits, 1)
        assert ids[:, 0].tolist() == logits.argmax(-1).tolist()
        assert weights.tolist() == [[1.0]] * 20

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_k_equals_num_experts_is_a_full_permutation(self, scoring):
        g = torch.Generator().manual_seed(4)
        logits = torch.randn(5, 7, generator=g)
        logits[0, 3] = NAN
        _, ids = check_routing(logits, 7, scoring)
        assert ids.sort(-1).values.tolist() == [list(range(7))] * 5
        assert ids[0, -1].item() == 3  # the NaN expert comes last

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_nan_ranks_below_every_finite_score(self, scoring):
        weights, ids = check_routing(row(NAN, -5.0, NAN, 3.0), 4, scoring, renormalize=False)
        assert ids.tolist() == [[3, 1, 0, 2]]  # valid by score, then NaN entries by index
        assert weights[0, 2:].tolist() == [0.0, 0.0]  # invalid entries carry p = 0

    def test_nan_does_not_poison_the_softmax_of_the_rest(self):
        weights, ids = check_routing(row(NAN, 0.0, math.log(3.0)), 2, "softmax", renormalize=False)
        assert ids.tolist() == [[2, 1]]
        torch.testing.assert_close(weights, torch.tensor([[0.75, 0.25]]))

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_negative_infinity_is_clamped_and_ranks_above_nan(self, scoring):
        _, ids = check_routing(row(NAN, -INF, 0.0), 3, scoring)
        assert ids.tolist() == [[2, 1, 0]]

    def test_single_positive_infinity_takes_all_softmax_weight(self):
        for renormalize in (True, False):
            weights, ids = check_routing(row(0.0, INF, 1.0, NAN), 3, "softmax", renormalize)
            assert ids.tolist() == [[1, 2, 0]]
            assert weights.tolist() == [[1.0, 0.0, 0.0]]

    def test_two_positive_infinities_share_the_softmax_weight(self):
        weights, ids = check_routing(row(INF, 0.0, INF, 5.0), 3, "softmax", renormalize=False)
        assert ids.tolist() == [[0, 2, 3]]  # a tie between the two +Inf: lower index first
        assert weights.tolist() == [[0.5, 0.5, 0.0]]

    def test_positive_infinity_with_sigmoid_has_weight_one(self):
        weights, ids = check_routing(row(0.0, INF, NAN), 2, "sigmoid", renormalize=False)
        assert ids.tolist() == [[1, 0]]
        assert weights.tolist() == [[1.0, 0.5]]

    def test_all_negative_infinity_softmax_is_uniform(self):
        # clamped to -FLT_MAX everywhere: equal finite logits, so a uniform softmax.
        weights, ids = check_routing(torch.full((2, 4), -INF), 2, "softmax", renormalize=False)
        assert ids.tolist() == [[0, 1]] * 2
        assert weights.tolist() == [[0.25, 0.25]] * 2

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
    def test_all_nan_row(self, scoring, dtype):
        logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
        logits[1] = NAN
        weights, ids = check_routing(logits, 3, scoring, renormalize=True)
        assert ids[1].tolist() == [0, 1, 2]
        assert weights[1].tolist() == [to_f32(1 / 3)] * 3  # 1/k in fp32
        weights, ids = check_routing(logits, 3, scoring, renormalize=False)
        assert ids[1].tolist() == [0, 1, 2]
        assert weights[1].tolist() == [0.0, 0.0, 0.0]

    def test_zero_sum_of_selected_weights_is_guarded(self):
        # sigmoid(-200) and sigmoid(-FLT_MAX) are 0 in fp32: the selected weights sum to 0.
        logits = row(-200.0, -300.0, -250.0, -INF)
        weights, ids = check_routing(logits, 2, "sigmoid", renormalize=True)
        assert ids.tolist() == [[0, 2]]
        assert weights.tolist() == [[0.5, 0.5]]
        weights, _ = check_routing(logits, 2, "sigmoid", renormalize=False)
        assert weights.tolist() == [[0.0, 0.0]]

    @pytest.mark.parametrize(
        "logits,scoring,bias",
        [
            # sigmoid(-88) ~ 6.1e-39 and sigmoid(-88.5) ~ 3.7e-39: subnormal in fp32, sum > 0.
            ([[-88.0, -88.5]], "sigmoid", None),
            # softmax p = [1, ~3.7e-44, ~1.4e-44]; the bias picks the two subnormal ones.
            ([[0.0, -100.0, -101.0]], "softmax", [-10.0, 0.0, 0.0]),
        ],
        ids=["sigmoid", "softmax-bias"],
    )
    def test_subnormal_but_positive_sum_still_renormalizes_to_one(self, logits, scoring, bias):
        bias = None if bias is None else torch.tensor(bias)
        weights, _ = topk_routing(torch.tensor(logits), 2, scoring, True, bias)
        assert weights.double().sum().item() == pytest.approx(1.0, abs=1e-5), weights

    def test_selection_is_by_logit_so_rounding_of_p_never_invents_ties(self):
        # The docstring's rule 3: without a bias the selection score is x itself. p rounds
        # to equal fp32 values here (0 and 0; 1.0 and 1.0), x does not: the larger x wins.
        # (A rule worded as "ids = top-k of p" with ties to the lower index
        # would pick expert 1 in the first row and expert 0 in the second.)
        _, ids = check_routing(row(0.0, -300.0, -200.0), 2, "softmax", renormalize=False)
        assert ids.tolist() == [[0, 2]]
        _, ids = check_routing(row(20.0, 30.0), 1, "sigmoid", renormalize=False)
        assert ids.tolist() == [[1]]

    def test_correction_bias_can_select_experts_whose_weight_is_zero(self):
        # softmax p = [1, 0, 0]; scores p + bias = [-9, 0, 0] -> ids 1, 2; their p sum to 0.
        weights, ids = check_routing(row(0.0, -200.0, -300.0), 2, "softmax", True, torch.tensor([-10.0, 0.0, 0.0]))
        assert ids.tolist() == [[1, 2]]
        assert weights.tolist() == [[0.5, 0.5]]

    def test_correction_bias_chooses_but_p_weighs(self):
        logits = row(2.0, 1.0, 0.0, -1.0)
        weights, ids = check_routing(logits, 2, "sigmoid", False, torch.tensor([0.0, 0.0, 0.0, 1.5]))
        assert ids.tolist() == [[3, 0]]
        torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([[-1.0, 2.0]])))

    def test_nan_logit_stays_invalid_whatever_its_bias(self):
        _, ids = check_routing(row(NAN, 0.0, 1.0), 2, "sigmoid", True, torch.tensor([100.0, 0.0, 0.0]))
        assert ids.tolist() == [[2, 1]]

    def test_nan_bias_makes_the_expert_invalid(self):
        weights, ids = check_routing(row(5.0, 0.0, 1.0), 3, "sigmoid", False, torch.tensor([NAN, 0.0, 0.0]))
        assert ids.tolist() == [[2, 1, 0]]
        assert weights[0, 2].item() == pytest.approx(_sigmoid(5.0), rel=1e-6)  # weight is still p

    def test_infinite_bias_is_clamped(self):
        # p + FLT_MAX rounds to FLT_MAX in fp32, so both +Inf-biased experts tie: lower index
        # first, although expert 1 has the larger p. -Inf bias ranks last but above NaN.
        bias = torch.tensor([INF, INF, 0.0, -INF, 0.0])
        _, ids = check_routing(row(0.0, 1.0, 2.0, 3.0, NAN), 5, "sigmoid", True, bias)
        assert ids.tolist() == [[0, 1, 2, 3, 4]]

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
    def test_half_precision_logits_with_special_values(self, dtype):
        logits = torch.tensor(
            [[1.0, NAN, INF, -INF, 0.5, 0.5], [NAN] * 6, [-INF] * 6, [3.0, 1e4, -1e4, 2.0, NAN, 0.0]], dtype=dtype
        )
        for scoring in ("softmax", "sigmoid"):
            for renormalize in (True, False):
                check_routing(logits, 4, scoring, renormalize)

    def test_fp16_overflow_to_inf_is_clamped_to_fp32_max(self):
        logits = torch.tensor([[70000.0, 65504.0, 0.0]]).to(torch.float16)  # the first is fp16 +Inf
        weights, ids = check_routing(logits, 2, "softmax", renormalize=False)
        assert ids.tolist() == [[0, 1]]
        assert weights.tolist() == [[1.0, 0.0]]


def deepseek_v3_problem(T, gen):
    """DeepSeek-V3's routing shape: E=256 in 8 groups, 4 kept, top-8, sigmoid + correction bias."""
    logits = torch.randn(T, 256, generator=gen) * 2
    bias = torch.randn(256, generator=gen) * 0.05
    return logits, 8, "sigmoid", True, bias, 8, 4, "top2_sum"


class TestTopkRoutingGroups:
    """Group-limited selection (DeepSeek-V3; "max": DeepSeek-V2's group-limited greedy)."""

    def test_deepseek_v3_shape_against_float64(self):
        g = torch.Generator().manual_seed(3)
        logits, *args = deepseek_v3_problem(16, g)
        logits[3, :40] = NAN
        logits[5, 100] = INF
        logits[6, 7] = -INF
        _, ids = check_routing(logits, *args)
        assert bool(((ids // 32).unsqueeze(-1) == (ids // 32).unsqueeze(-2)).sum(-1).le(8).all())

    def test_deepseek_v3_kept_groups_by_hand(self):
        # Group g (32 experts) holds one clear winner 10 + g and a runner-up; the top-2 sums
        # rank the groups 5 > 2 > 7 > 0 > others, whatever the single best experts say.
        logits = torch.full((1, 256), -5.0)
        top1 = {0: 4.0, 1: 9.0, 2: 5.0, 3: 1.0, 4: 1.0, 5: 6.0, 6: 1.0, 7: 4.5}
        top2 = {0: 3.5, 1: -4.0, 2: 4.5, 3: 1.0, 4: 0.5, 5: 5.5, 6: 0.0, 7: 4.0}
        for g in range(8):
            logits[0, 32 * g + 3] = top1[g]
            logits[0, 32 * g + 17] = top2[g]
        weights, ids = check_routing(logits, 8, "sigmoid", True, None, 8, 4, "top2_sum")
        # Kept groups 5, 2, 7, 0; ids by descending logit, the -5.0 fillers by index.
        assert ids.tolist() == [[163, 177, 67, 81, 227, 3, 241, 17]]
        assert 35 not in ids.tolist()[0]  # group 1's 9.0 is dropped with its group
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))

    def test_max_group_score_keeps_the_groups_of_the_best_experts(self):
        logits = torch.full((1, 256), -5.0)
        for g, (a, b) in enumerate([(4.0, 3.5), (9.0, -4.0), (5.0, 4.5), (1.0, 1.0)] * 2):
            logits[0, 32 * g + 3] = a - 0.01 * g
            logits[0, 32 * g + 17] = b - 0.01 * g
        _, ids = check_routing(logits, 4, "softmax", True, None, 8, 2, "max")
        # Groups 1 and 5 (best 9.0, 8.96) are kept: their runners-up at -4 beat group 2's 5.0.
        assert ids.tolist() == [[35, 163, 49, 177]]

    @pytest.mark.parametrize("num_experts", [160, 384])
    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_one_group_is_the_ungrouped_op(self, num_experts, scoring):
        g = torch.Generator().manual_seed(num_experts)
        logits = torch.randn(8, num_experts, generator=g)
        logits[2, ::3] = NAN
        bias = torch.randn(num_experts, generator=g) * 0.1
        for group_score in ("top2_sum", "max"):
            weights, ids = check_routing(logits, 8, scoring, True, bias, 1, 1, group_score)
            plain_weights, plain_ids = topk_routing(logits, 8, scoring, True, bias)
            assert torch.equal(ids, plain_ids) and torch.equal(weights, plain_weights)

    def test_top2_sum_without_a_bias_ranks_groups_by_probabilities(self):
        # softmax: group 0 = {5, -4} scores exp(0) + exp(-9) ~ 1.0001 (p's numerators, the
        # row max 5), group 1 = {3, 3} 2 exp(-2) ~ 0.27: group 0 is kept, although its logits
        # sum to 1 and group 1's to 6.
        weights, ids = check_routing(row(5.0, -4.0, 3.0, 3.0, 0.0, 0.0), 2, "softmax", False, None, 3, 1)
        assert ids.tolist() == [[0, 1]]
        assert weights[0, 0].item() == pytest.approx(1 / (1 + math.exp(-9) + 2 * math.exp(-2) + 2 * math.exp(-5)))
        # sigmoid: group 0 = {6, -3} scores 0.9975 + 0.0474 = 1.045, group 1 = {1, 1}
        # 2 * 0.731 = 1.462: group 1 is kept, although group 0's logits sum higher (3 > 2).
        _, ids = check_routing(row(6.0, -3.0, 1.0, 1.0), 2, "sigmoid", True, None, 2, 1)
        assert ids.tolist() == [[2, 3]]
        # "max" still ranks by the best expert: group 0 (6 > 1).
        _, ids = check_routing(row(6.0, -3.0, 1.0, 1.0), 2, "sigmoid", True, None, 2, 1, "max")
        assert ids.tolist() == [[0, 1]]

    def test_softmax_group_terms_below_exp_minus_87_count_zero(self):
        # Row max 100. Group 1 = {12, 11} (t = -88, -89) and group 2 = {12.5, 12.5} (t = -87.5)
        # both score 0: a tie, so group 1 is kept with group 0, although 2 exp(-87.5) > exp(-88)
        # + exp(-89) (subnormal numbers).
        _, ids = check_routing(row(100.0, 100.0, 12.0, 11.0, 12.5, 12.5), 3, "softmax", True, None, 3, 2)
        assert ids.tolist() == [[0, 1, 2]]
        # At t = -86.5 the term is exp(-86.5) ~ 2.7e-38, a normal float: group 2 wins.
        _, ids = check_routing(row(100.0, 100.0, 12.0, 11.0, 13.5, 12.5), 3, "softmax", True, None, 3, 2)
        assert ids.tolist() == [[0, 1, 4]]

    def test_sigmoid_group_terms_keep_subnormal_probabilities(self):
        # sigmoid(-88) ~ 6.05e-39 (subnormal): group 0 scores 1.21e-38, group 1 = {-87.2, -89}
        # sigmoid(-87.2) + 0 ~ 1.35e-38 and is kept (by logits, -176 > -176.2, group 0 would be).
        weights, ids = check_routing(row(-88.0, -88.0, -87.2, -89.0), 2, "sigmoid", False, None, 2, 1)
        assert ids.tolist() == [[2, 3]]
        assert weights[0, 0].item() == pytest.approx(_sigmoid(to_f32(-87.2)), rel=1e-6)

    def test_group_ties_go_to_the_lower_group(self):
        # Groups 1 and 3 hold the same logits, so the same probabilities: a tie, group 1 is kept.
        logits = row(0.0, 0.0, 3.0, 1.0, 0.0, 0.0, 1.0, 3.0)
        for scoring in ("softmax", "sigmoid"):
            for group_score in ("top2_sum", "max"):
                _, ids = check_routing(logits, 2, scoring, True, None, 4, 1, group_score)
                assert ids.tolist() == [[2, 3]]
        _, ids = check_routing(row(1.0, 1.0, 1.0, 1.0, 1.0, 1.0), 3, "sigmoid", True, None, 3, 2)
        assert ids.tolist() == [[0, 1, 2]]

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_a_nan_member_counts_as_minus_flt_max(self, scoring):
        # Group 0 = {NaN, 9}: p(9) - FLT_MAX rounds to -FLT_MAX, below group 1's {0, 0}.
        _, ids = check_routing(row(NAN, 9.0, 0.0, 0.0), 2, scoring, False, None, 2, 1)
        assert ids.tolist() == [[2, 3]]
        # With "max" group 0 scores 9 and is kept; its NaN member comes last, by index.
        _, ids = check_routing(row(NAN, 9.0, 0.0, 0.0), 2, scoring, False, None, 2, 1, "max")
        assert ids.tolist() == [[1, 0]]

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_all_nan_group_ranks_below_every_group_with_a_valid_expert(self, scoring):
        # Group 0 all NaN: -FLT_MAX + -FLT_MAX = -Inf. Group 2 = {1, NaN}: p(1) - FLT_MAX =
        # -FLT_MAX. Group 1 = {-Inf, -Inf}: clamped, valid, p = 0 (sigmoid) or 1/2 (softmax,
        # the row max is -FLT_MAX too, at index 2), so groups 1 and 2 are kept.
        logits = row(NAN, NAN, -INF, -INF, 1.0, NAN)
        _, ids = check_routing(logits, 3, scoring, True, None, 3, 2)
        assert ids.tolist() == [[4, 2, 3]]
        _, ids = check_routing(row(NAN, NAN, -INF, -INF), 2, scoring, True, None, 2, 1)
        assert ids.tolist() == [[2, 3]]

    def test_max_of_a_clamped_infinity_ties_with_an_all_nan_group(self):
        # "max" ranks by the logits: group 1's best, -Inf clamped to -FLT_MAX, ties with the
        # all-NaN group 0's -FLT_MAX, so group 0 is kept (with group 2); its NaN experts come
        # after the valid expert 4, by index.
        _, ids = check_routing(row(NAN, NAN, -INF, -INF, 1.0, NAN), 3, "sigmoid", True, None, 3, 2, "max")
        assert ids.tolist() == [[4, 0, 1]]

    @pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
    @pytest.mark.parametrize("group_score", ["top2_sum", "max"])
    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
    def test_all_nan_row_keeps_the_first_groups(self, with_bias, group_score, scoring, dtype):
        logits = torch.full((2, 64), NAN, dtype=dtype)
        bias = torch.zeros(64) if with_bias else None
        weights, ids = check_routing(logits, 8, scoring, True, bias, 8, 4, group_score)
        assert ids.tolist() == [list(range(8))] * 2
        assert weights.tolist() == [[0.125] * 8] * 2

    def test_positive_infinities_overflow_a_biased_group_score_to_inf(self):
        # p + bias with +Inf bias clamps to FLT_MAX: group 1 = FLT_MAX + FLT_MAX = +Inf, above
        # group 0's FLT_MAX + 0.5 = FLT_MAX.
        bias = torch.tensor([INF, 0.0, INF, INF, 5.0, 5.0])
        _, ids = check_routing(torch.zeros(1, 6), 2, "sigmoid", True, bias, 3, 1)
        assert ids.tolist() == [[2, 3]]

    def test_two_positive_infinities_make_the_best_softmax_group(self):
        # Clamped to FLT_MAX, the row max: group 1 = {+Inf, +Inf} scores exp(0) + exp(0) = 2,
        # group 0 = {+Inf, 0} 1 + 0 (0 - FLT_MAX is far below -87), group 2 0.
        _, ids = check_routing(row(INF, 0.0, INF, INF, 5.0, 5.0), 2, "softmax", True, None, 3, 1)
        assert ids.tolist() == [[2, 3]]

    def test_single_expert_groups_score_their_only_expert(self):
        logits = row(1.0, NAN, 3.0, -INF, 2.0)
        for group_score in ("top2_sum", "max"):
            _, ids = check_routing(logits, 3, "sigmoid", True, None, 5, 3, group_score)
            assert ids.tolist() == [[2, 4, 0]]

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_k_equal_to_the_kept_experts_takes_all_of_them(self, scoring):
        g = torch.Generator().manual_seed(7)
        logits = torch.randn(4, 32, generator=g)
        logits[1, 8:12] = NAN
        _, ids = check_routing(logits, 12, scoring, True, torch.randn(32, generator=g) * 0.1, 8, 3)
        groups = (ids // 4).sort(-1).values
        assert bool((groups[:, ::4] == groups[:, 3::4]).all())  # three whole groups

    def test_correction_bias_chooses_the_groups(self):
        # Same logits; the bias of experts 2, 3 lifts group 1 above group 0.
        logits = row(2.0, 2.0, 0.0, 0.0)
        _, ids = check_routing(logits, 2, "sigmoid", False, torch.tensor([0.0, 0.0, 1.0, 1.0]), 2, 1)
        assert ids.tolist() == [[2, 3]]

    @pytest.mark.parametrize("group_score", ["top2_sum", "max"])
    @pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
    def test_opcheck(self, group_score, with_bias):
        g = torch.Generator().manual_seed(1)
        logits = torch.randn(5, 32, generator=g)
        bias = torch.randn(32, generator=g) if with_bias else None
        torch.library.opcheck(topk_routing, (logits, 4, "sigmoid", True, bias, 8, 3, group_score))

    def test_opcheck_zero_tokens(self):
        torch.library.opcheck(topk_routing, (torch.randn(0, 16), 2, "softmax", True, None, 4, 2, "max"))


GROUP_BAD_INPUTS = {
    "n_group_zero": ((2, 0, 1, "top2_sum"), r"n_group must be >= 1, got n_group=0"),
    "E_not_divisible": ((2, 3, 1, "top2_sum"), r"E must be divisible by n_group, got E=8, n_group=3"),
    "topk_group_zero": ((2, 4, 0, "top2_sum"), r"need 1 <= topk_group <= n_group, got topk_group=0, n_group=4"),
    "topk_group_above_n_group": ((2, 4, 5, "top2_sum"), r"need 1 <= topk_group <= n_group, got topk_group=5"),
    "k_above_kept_experts": ((5, 4, 2, "top2_sum"), r"need k <= topk_group \* E / n_group, got k=5, topk_group=2"),
    "unknown_group_score": ((2, 4, 2, "sum"), r"group_score must be one of \('top2_sum', 'max'\), got 'sum'"),
}


class TestTopkRoutingGroupBadInputs:
    @pytest.mark.parametrize("case", list(GROUP_BAD_INPUTS))
    def test_value_error_names_the_argument(self, case):
        (k, n_group, topk_group, group_score), message = GROUP_BAD_INPUTS[case]
        with pytest.raises(ValueError, match=r"topk_routing: " + message):
            topk_routing(torch.randn(2, 8), k, "softmax", True, None, n_group, topk_group, group_score)

    @pytest.mark.parametrize("case", list(GROUP_BAD_INPUTS))
    def test_fake_implementation_rejects_the_same_inputs(self, case):
        from torch._subclasses.fake_tensor import FakeTensorMode

        (k, n_group, topk_group, group_score), message = GROUP_BAD_INPUTS[case]
        with FakeTensorMode():
            logits = torch.randn(2, 8)
            with pytest.raises(ValueError, match=message):
                topk_routing(logits, k, "softmax", True, None, n_group, topk_group, group_score)


_special = st.sampled_from([NAN, INF, -INF, 0.0, 1.0, -1.0, 1e30, -1e30, FLT_MAX])
_finite = st.floats(-40.0, 40.0, width=32)


@st.composite
def routing_problems(draw):
    E = draw(st.integers(1, 12))
    T = draw(st.integers(0, 4))
    n_group = draw(st.sampled_from([d for d in range(1, E + 1) if E % d == 0]))
    topk_group = draw(st.integers(1, n_group))
    group_score = draw(st.sampled_from(["top2_sum", "max"]))
    k = draw(st.integers(1, topk_group * E // n_group))
    values = draw(st.lists(st.one_of(_finite, _special), min_size=T * E, max_size=T * E))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    logits = torch.tensor(values, dtype=torch.float32).reshape(T, E).to(dtype)
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    renormalize = draw(st.booleans())
    bias = None
    if draw(st.booleans()):
        bias = torch.tensor(draw(st.lists(st.one_of(_finite, _special), min_size=E, max_size=E)))
    return logits, k, scoring, renormalize, bias, (n_group, topk_group, group_score)


class TestTopkRoutingProperties:
    @settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @given(routing_problems())
    def test_every_row_gets_k_distinct_ids_and_sane_weights(self, problem):
        logits, k, scoring, renormalize, bias, group_args = problem
        weights, ids = topk_routing(logits, k, scoring, renormalize, bias, *group_args)
        T, E = logits.shape
        assert_routing_invariants(weights, ids, T, k, E, renormalize)
        if bias is None:
            # Without a bias the selection score is x itself and the group terms are fp32
            # sigmoids or exps of fp32 differences: ids are exact, whatever NaN, Inf or ties
            # the row holds.
            expected_weights, expected_ids = routing_float64(logits, k, scoring, renormalize, None, *group_args)
            assert ids.tolist() == expected_ids.tolist()
            torch.testing.assert_close(weights.double(), expected_weights, rtol=1e-5, atol=1e-7)


TOPK_BAD_INPUTS = {
    "k_greater_than_E": (lambda: (torch.randn(2, 4), 5, "softmax", None), r"need 1 <= k <= E, got k=5, E=4"),
    "k_zero": (lambda: (torch.randn(2, 4), 0, "softmax", None), r"need 1 <= k <= E, got k=0"),
    "k_negative": (lambda: (torch.randn(2, 4), -1, "softmax", None), r"need 1 <= k <= E, got k=-1"),
    "unknown_scoring": (lambda: (torch.randn(2, 4), 2, "relu", None), r"scoring must be one of .*'relu'"),
    "logits_1d": (lambda: (torch.randn(4), 2, "softmax", None), r"logits must be 2-D \[T, E\]"),
    "logits_3d": (lambda: (torch.randn(2, 3, 4), 2, "softmax", None), r"logits must be 2-D \[T, E\]"),
    "int_logits": (lambda: (torch.ones(2, 4, dtype=torch.int64), 2, "softmax", None), r"logits must be floating point, got torch\.int64"),
    "no_experts": (lambda: (torch.randn(2, 0), 1, "softmax", None), r"logits must have at least one expert column"),
    "bias_wrong_length": (
        lambda: (torch.randn(2, 4), 2, "sigmoid", torch.randn(5)),
        r"correction_bias must be \[E\]=4, got shape \(5,\)",
    ),
    "bias_2d": (
        lambda: (torch.randn(2, 4), 2, "sigmoid", torch.randn(1, 4)),
        r"correction_bias must be \[E\]=4, got shape \(1, 4\)",
    ),
    "int_bias": (
        lambda: (torch.randn(2, 4), 2, "sigmoid", torch.ones(4, dtype=torch.int32)),
        r"correction_bias must be floating point",
    ),
}


class TestTopkRoutingBadInputs:
    @pytest.mark.parametrize("case", list(TOPK_BAD_INPUTS))
    def test_value_error_names_the_problem(self, case):
        build, message = TOPK_BAD_INPUTS[case]
        logits, k, scoring, bias = build()
        with pytest.raises(ValueError, match=r"topk_routing: " + message):
            topk_routing(logits, k, scoring, True, bias)


# ========================================================= fused_allreduce_rmsnorm


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    """A single-process gloo group (world size 1); its group_name for the op."""
    if dist.is_initialized():  # someone else's default group; usable only if it is world size 1
        if dist.get_world_size() != 1:
            pytest.skip("a default process group with world size > 1 already exists")
        yield dist.group.WORLD.group_name
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def rmsnorm_float64(h, weight, eps):
    h64 = h.double()
    return h64 * torch.rsqrt(h64.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.double()


# fp32 results: the reference computes in fp32 (squares, a length-H mean, rsqrt, two
# products), which are a few fp32 roundings besides the last one; 16-bit results are
# dominated by their own final rounding.
RMSNORM_ULPS = {torch.float32: 4, torch.bfloat16: 1, torch.float16: 1}


class TestFusedAllreduceRmsnormWorldOfOne:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
    @pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
    def test_opcheck(self, world_of_one, dtype, with_residual):
        # All of opcheck's tests run: the reference's all-reduce is the functional
        # _c10d_functional.all_reduce + wait_tensor, which eager, fake and AOT dispatch
        # all handle for a live gloo group.
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 64, generator=g).to(dtype)
        residual = torch.randn(3, 64, generator=g).to(dtype) if with_residual else None
        weight = torch.randn(64, generator=g).to(dtype)
        torch.library.opcheck(fused_allreduce_rmsnorm, (x, residual, weight, 1e-6, world_of_one))

    @pytest.mark.parametrize(
        "dtype,weight_dtype",
        [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
         (torch.float16, torch.float32)],
        ids=["fp32", "bf16", "bf16-fp32_weight", "fp16-fp32_weight"],
    )
    @pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
    @pytest.mark.parametrize("shape", [(1, 64), (7, 72), (2, 3, 128)], ids=lambda s: "x".join(map(str, s)))
    def test_against_float64(self, world_of_one, dtype, weight_dtype, with_residual, shape):
        g = torch.Generator().manual_seed(sum(shape))
        x = torch.randn(shape, generator=g).to(dtype)
        residual = torch.randn(shape, generator=g).to(dtype) if with_residual else None
        weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(weight_dtype)
        eps = 1e-5
        inputs_before = [t.clone() for t in (x, residual, weight) if t is not None]

        out, residual_out = fused_allreduce_rmsnorm(x, residual, weight, eps, world_of_one)

        # world size 1: r = x; h = r + residual, rounded once to x's dtype.
        h = x.double() if residual is None else x.double() + residual.double()
        assert residual_out.dtype == dtype and residual_out.shape == x.shape
        assert torch.equal(residual_out, h.to(dtype)), "residual_out is not x + residual rounded once"
        assert out.dtype == dtype and out.shape == x.shape
        assert_within_ulps(out, rmsnorm_float64(residual_out, weight, eps), dtype, RMSNORM_ULPS[dtype])
        # Functional: nothing was written in place.
        for before, now in zip(inputs_before, [t for t in (x, residual, weight) if t is not None]):
            assert torch.equal(before, now)

    def test_eps_matters_for_a_zero_row(self, world_of_one):
        x = torch.zeros(2, 16)
        x[1] = 3.0
        out, _ = fused_allreduce_rmsnorm(x, None, torch.ones(16), 1e-6, world_of_one)
        assert out[0].tolist() == [0.0] * 16  # 0 * rsqrt(0 + eps) * w, not NaN
        torch.testing.assert_close(out[1], torch.full((16,), 3.0 / math.sqrt(9.0 + 1e-6)))

    @pytest.mark.parametrize(
        "case,build,message",
        [
            ("weight_wrong_length", lambda: (torch.randn(2, 8), None, torch.randn(9)), r"weight must be \[H\]=8"),
            ("weight_2d", lambda: (torch.randn(2, 8), None, torch.randn(1, 8)), r"weight must be \[H\]=8"),
            ("residual_shape", lambda: (torch.randn(2, 8), torch.randn(3, 8), torch.randn(8)), r"residual .* must match x"),
            (
                "residual_dtype",
                lambda: (torch.randn(2, 8), torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8)),
                r"residual .* must match x",
            ),
            ("int_x", lambda: (torch.ones(2, 8, dtype=torch.int32), None, torch.ones(8)), r"x must be floating point"),
        ],
    )
    def test_bad_inputs(self, world_of_one, case, build, message):
        x, residual, weight = build()
        with pytest.raises(ValueError, match=r"fused_allreduce_rmsnorm: " + message):
            fused_allreduce_rmsnorm(x, residual, weight, 1e-6, world_of_one)
