"""fusion_passes::topk_routing: the CUDA kernel against the reference, and the reference
against its own invariants.

The `cuda` tests call the op on GPU tensors, which runs csrc/topk_routing.cu (the
`kernel` fixture makes sure it is built and registered, so that no test silently
compares the reference with itself), and compare with the reference's computation run in
plain torch on the same GPU tensors (`topk_routing_in_torch`). `test_reference_invariants`
needs no GPU.

Inputs are drawn fresh on every run (the seed is in each failure message). What must agree:
- sigmoid scoring (with or without a correction bias, grouped or not, renormalized or not):
  ids AND weights bitwise. The kernel computes p as torch.sigmoid does on CUDA, p + bias and
  the group sums with IEEE fp32 adds, and the renormalization sum in the reference's order.
- softmax without a bias: ids exactly (the selection score is the logit itself; the group
  terms of top2_sum, exp(x - max), are torch.exp's bits on CUDA, and the group sums IEEE fp32
  adds); weights within fp32 rounding (the kernel's exp for them and its sum order differ
  from torch's).
- softmax with a bias: the selection score p + bias differs by rounding, so ids may differ
  only between experts whose reference selection scores tie within rounding (and a row whose
  group scores tie within rounding at the cut may keep either group); the weights are
  checked against the reference's p at the kernel's ids.

Every test runs ungrouped and group-limited (`grouping`): groups chosen by `group_args` for
the test's E and k, with either group score, and shapes that are not a power of two of whole
lanes (the kernel's scanning group path) where E has one; `test_group_shapes` covers the
group shapes of real models and odd ones explicitly.
"""

from __future__ import annotations

import itertools
import secrets

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_passes import kernels
from fusion_passes.ops import _clamp_infinities, topk_routing_in_torch, topk_routing_reference

EXPERT_COUNTS = (1, 8, 16, 32, 60, 64, 128, 160, 256, 384, 512)
TOKEN_COUNTS = (0, 1, 2, 3, 7, 31, 64, 127, 257, 1000, 4097, 8192)
SWEEP_TOKEN_COUNTS = TOKEN_COUNTS[:-2]  # the large counts run in test_token_counts
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCORINGS = ("softmax", "sigmoid")
BIAS_KINDS = (None, "float32", "bfloat16")
GROUPINGS = ("ungrouped", "grouped_top2_sum", "grouped_max", "grouped_scan")
UNGROUPED = (1, 1, "top2_sum")
FLT_MIN = torch.finfo(torch.float32).tiny

# Softmax weights agree to fp32 rounding: both sides use < 1 ulp exp and correctly rounded
# division; the softmax sums are reduced in different orders. ATOL covers subnormal probabilities.
RTOL = 1e-5
ATOL = 1e-6
# Selection scores (p + bias) of experts the kernel may order either way.
SCORE_RTOL = 2.0**-20
SCORE_ATOL = 1e-6


def ks_for(num_experts: int) -> list[int]:
    return sorted({k for k in (1, 2, 4, 6, 8, num_experts) if k <= min(num_experts, 32)})


def experts_per_lane(num_experts: int) -> int:
    """The kernel's experts per lane (csrc/topk_select.cuh, experts_per_lane)."""
    return next(b for b in (1, 2, 4, 6, 8, 12, 16) if 32 * b >= num_experts)


def butterfly_groups(num_experts: int, n_group: int) -> bool:
    """Whether the kernel scores these groups by its butterfly (a power of two of whole
    lanes a group), not by scanning."""
    group_size, vpl = num_experts // n_group, experts_per_lane(num_experts)
    lanes = group_size // vpl
    return group_size % vpl == 0 and lanes & (lanes - 1) == 0


def group_args(grouping: str, num_experts: int, k: int) -> tuple[int, int, str]:
    """(n_group, topk_group, group_score) for a test: 8 groups where E allows (else the
    smallest divisor of E among 4, 2, 3, 5); for "grouped_scan" the first divisor that the
    kernel scans (none when E is a power of two: then as "grouped_top2_sum"). Half of the
    groups kept, more if k needs them."""
    if grouping == "ungrouped":
        return UNGROUPED
    n_group = next((d for d in (8, 4, 2, 3, 5) if num_experts % d == 0 and d < num_experts), 1)
    if num_experts == 8:
        n_group = 8  # single-expert groups
    if grouping == "grouped_scan":
        divisors = (3, 5, 6, 10, 12, 32, 2, 4)
        n_group = next((d for d in divisors if num_experts % d == 0 and not butterfly_groups(num_experts, d)), n_group)
    topk_group = max(1, n_group // 2)
    while k > topk_group * (num_experts // n_group):
        topk_group += 1
    return n_group, topk_group, "max" if grouping == "grouped_max" else "top2_sum"


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(62)
    return torch.Generator().manual_seed(seed), seed


def make_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows of four kinds: Gaussian at assorted scales, a few repeated levels (many exact
    ties), constant, and one-hot-like (a few high experts over a flat floor)."""
    scale = torch.tensor([0.05, 1.0, 4.0, 30.0])[torch.randint(0, 4, (num_tokens, 1), generator=gen)]
    gaussian = torch.randn(num_tokens, num_experts, generator=gen) * scale
    levels = torch.randint(-3, 4, (num_tokens, num_experts), generator=gen).float() * 0.75
    constant = torch.randn(num_tokens, 1, generator=gen).expand(num_tokens, num_experts)
    peaks = torch.where(torch.rand(num_tokens, num_experts, generator=gen) < 0.05, 5.0, -2.0)
    kind = torch.randint(0, 4, (num_tokens, 1), generator=gen)
    logits = torch.where(kind == 0, gaussian, torch.where(kind == 1, levels, torch.where(kind == 2, constant, peaks)))
    return logits.to(dtype)


def make_bias(kind: str | None, num_experts: int, gen: torch.Generator) -> torch.Tensor | None:
    """None, or a per-expert bias on the GPU the size of typical probabilities, half the time
    on a coarse grid so that experts tie."""
    if kind is None:
        return None
    bias = torch.randn(num_experts, generator=gen) * 0.05
    if torch.rand((), generator=gen) < 0.5:
        bias = torch.round(bias * 64) / 64
    return bias.to(getattr(torch, kind)).cuda()


def reference_probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """p of every expert, taken from the reference itself (k=E, no bias, no renormalization),
    on the logits' device."""
    num_experts = logits.shape[1]
    weights, ids = topk_routing_in_torch(logits, num_experts, scoring, False, None)
    return torch.zeros_like(weights).scatter_(1, ids, weights)


def selection_keys(logits: torch.Tensor, probs: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference's selection score of every expert, -inf where invalid (NaN)."""
    x = _clamp_infinities(logits)
    valid = ~torch.isnan(x)
    if bias is None:
        score = x
    else:
        score = _clamp_infinities(probs + _clamp_infinities(bias))
        valid &= ~torch.isnan(score)
    return score.masked_fill(~valid, float("-inf"))


def renormalized(weights: torch.Tensor, k: int) -> torch.Tensor:
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), 1.0 / k)


def assert_routing_invariants(weights, ids, num_experts, k, renormalize, msg=""):
    """k distinct ids in [0, E) per row; finite weights >= 0; with renormalization they sum
    to 1 (also when the selected probabilities sum to a subnormal number)."""
    num_tokens = ids.shape[0]
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32, msg
    assert tuple(ids.shape) == (num_tokens, k) and tuple(weights.shape) == (num_tokens, k), msg
    assert bool(((ids >= 0) & (ids < num_experts)).all()), f"ids out of range {msg}"
    if k > 1:
        assert bool((ids.sort(dim=1).values.diff(dim=1) != 0).all()), f"repeated ids {msg}"
    assert bool(torch.isfinite(weights).all()), f"non-finite weights {msg}"
    assert bool((weights >= 0).all()), f"negative weights {msg}"
    if renormalize and num_tokens:
        sums = weights.double().sum(dim=1)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5, msg=msg)


def group_scores(keys: torch.Tensor, n_group: int, group_score: str) -> torch.Tensor:
    """[T, n_group] fp32 group scores of the reference's selection keys (invalid: -FLT_MAX)."""
    finfo = torch.finfo(torch.float32)
    grouped = keys.masked_fill(keys == float("-inf"), finfo.min).view(keys.shape[0], n_group, -1)
    if group_score == "max" or grouped.shape[-1] == 1:
        return grouped.amax(-1)
    top2 = grouped.topk(2, dim=-1).values
    return top2[..., 0] + top2[..., 1]


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str, msg: str) -> None:
    """Same bits (floats compared as integers: -0 is not 0), else the first differing row."""
    bits = (lambda t: t.view(torch.int32)) if actual.dtype == torch.float32 else (lambda t: t)
    differ = (bits(actual) != bits(expected)).any(dim=-1)
    if bool(differ.any()):
        row = int(differ.nonzero()[0])
        raise AssertionError(
            f"{what} differ in {int(differ.sum())} rows {msg}; first row {row}:\n"
            f"kernel    {actual[row].tolist()}\nreference {expected[row].tolist()}"
        )


def assert_matches_reference(logits, k, scoring, renormalize, bias, weights, ids, msg="", groups=UNGROUPED):
    """The kernel's (weights, ids) against the reference computed on the same tensors (see the
    module docstring for what must agree)."""
    ref_weights, ref_ids = topk_routing_in_torch(logits, k, scoring, renormalize, bias, *groups)
    assert_routing_invariants(weights, ids, logits.shape[1], k, renormalize, msg)
    if scoring == "sigmoid":
        assert_bitwise_equal(ids, ref_ids, "ids", msg)
        assert_bitwise_equal(weights, ref_weights, "weights", msg)
        return
    if bias is None:
        assert_bitwise_equal(ids, ref_ids, "ids", msg)
        torch.testing.assert_close(weights, ref_weights, rtol=RTOL, atol=ATOL, msg=lambda m: f"weights {msg}\n{m}")
        return
    probs = reference_probs(logits, scoring)
    selected_probs = probs.gather(1, ids)
    keys = selection_keys(logits, probs, bias)
    rows = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    n_group, topk_group, group_score = groups
    if n_group > 1 and ids.shape[0]:
        # Rows whose group cut is a tie within rounding may keep either group; every id must
        # still come from a group that scores at least the cut, less rounding.
        scores = group_scores(keys, n_group, group_score).double()
        ranked = scores.sort(dim=-1, descending=True).values
        cut = ranked[:, topk_group - 1 : topk_group]
        # An infinite cut (two experts at +-FLT_MAX overflow a top-2 sum) is exact: no slack,
        # which would make it NaN.
        slack = torch.where(torch.isfinite(cut), 2 * (SCORE_RTOL * cut.abs() + SCORE_ATOL), 0.0)
        if topk_group < n_group:
            rows = ~((ranked[:, topk_group : topk_group + 1] >= cut - slack).squeeze(1) & torch.isfinite(cut).squeeze(1))
        id_groups = ids // (logits.shape[1] // n_group)
        assert bool((scores.gather(1, id_groups) >= cut - slack).all()), f"an id from a dropped group {msg}"
    torch.testing.assert_close(
        keys.gather(1, ids)[rows],
        keys.gather(1, ref_ids)[rows],
        rtol=SCORE_RTOL,
        atol=SCORE_ATOL,
        msg=lambda m: f"selection differs beyond rounding {msg}\n{m}",
    )
    expected = renormalized(selected_probs, k) if renormalize else selected_probs
    torch.testing.assert_close(weights, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"weights {msg}\n{m}")


def run_op(logits, k, scoring, renormalize, bias, groups=UNGROUPED):
    return torch.ops.fusion_passes.topk_routing(logits, k, scoring, renormalize, bias, *groups)


def check_with_fresh_bias(logits, k, scoring, renormalize, bias_kind, groups, gen, seed):
    """The op on these GPU logits, with a fresh bias of bias_kind, against the reference."""
    num_tokens, num_experts = logits.shape
    bias = make_bias(bias_kind, num_experts, gen)
    weights, ids = run_op(logits, k, scoring, renormalize, bias, groups)
    msg = f"[seed={seed} T={num_tokens} E={num_experts} k={k} {logits.dtype} {scoring} renorm={renormalize} bias={bias_kind} groups={groups}]"
    assert_matches_reference(logits, k, scoring, renormalize, bias, weights, ids, msg, groups)


@pytest.fixture(scope="module")
def kernel():
    assert kernels.load(), f"CUDA kernels did not build/load: {kernels.load_error()}"
    assert kernels.has_cuda_kernel("topk_routing")


# ------------------------------------------------------------------------- against the reference


@pytest.mark.cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("num_experts", EXPERT_COUNTS)
def test_matches_reference(kernel, num_experts, grouping):
    """Every k, dtype, scoring, renormalization and bias kind for this E, T cycling through
    SWEEP_TOKEN_COUNTS."""
    gen, seed = fresh_generator()
    case = 0
    for k in ks_for(num_experts):
        groups = group_args(grouping, num_experts, k)
        for dtype in LOGIT_DTYPES:
            for scoring in SCORINGS:
                for renormalize in (True, False):
                    for bias_kind in BIAS_KINDS:
                        num_tokens = SWEEP_TOKEN_COUNTS[(case + num_experts) % len(SWEEP_TOKEN_COUNTS)]
                        case += 1
                        logits = make_logits(num_tokens, num_experts, dtype, gen).cuda()
                        check_with_fresh_bias(logits, k, scoring, renormalize, bias_kind, groups, gen, seed)


@pytest.mark.cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_token_counts(kernel, num_tokens, grouping):
    """Every T (up to 8192) for common shapes: E=128 k=8 softmax, E=256 k=8 sigmoid with a
    bias, E=512 k=6 softmax with a bf16 bias."""
    gen, seed = fresh_generator()
    shapes = ((128, 8, "softmax", None), (256, 8, "sigmoid", "float32"), (512, 6, "softmax", "bfloat16"))
    for num_experts, k, scoring, bias_kind in shapes:
        groups = group_args(grouping, num_experts, k)
        for dtype in LOGIT_DTYPES:
            logits = make_logits(num_tokens, num_experts, dtype, gen).cuda()
            check_with_fresh_bias(logits, k, scoring, True, bias_kind, groups, gen, seed)


@pytest.mark.cuda
@pytest.mark.parametrize("scoring", SCORINGS)
def test_ties_go_to_lower_index_with_bias(kernel, scoring):
    """Equal logits and equal bias give exactly equal scores in both implementations, and a
    bias of 0 or 2 (above any p) keeps unequal scores far apart: the ids must be exactly the
    reference's, ascending within each tie."""
    gen, seed = fresh_generator()
    for num_experts in (8, 60, 256, 512):
        levels = torch.randint(0, 3, (257, num_experts), generator=gen).float()
        bias = torch.randint(0, 2, (num_experts,), generator=gen).float() * 2
        for dtype in LOGIT_DTYPES:
            logits = levels.to(dtype).cuda()
            k = min(8, num_experts)
            weights, ids = run_op(logits, k, scoring, True, bias.cuda())
            ref_weights, ref_ids = topk_routing_in_torch(logits, k, scoring, True, bias.cuda())
            assert_bitwise_equal(ids, ref_ids, "ids", f"[seed={seed} E={num_experts} {dtype}]")
            torch.testing.assert_close(weights, ref_weights, rtol=RTOL, atol=ATOL)


@pytest.mark.cuda
def test_bias_dtypes(kernel):
    gen, seed = fresh_generator()
    logits = make_logits(99, 256, torch.bfloat16, gen).cuda()
    for bias_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        bias = (torch.randn(256, generator=gen) * 0.05).to(bias_dtype).cuda()
        for scoring in SCORINGS:
            weights, ids = run_op(logits, 8, scoring, True, bias)
            assert_matches_reference(logits, 8, scoring, True, bias, weights, ids, f"[seed={seed} {bias_dtype}]")


@pytest.mark.cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_strided_and_misaligned_logits(kernel, grouping):
    """Row strides wider than E, a storage offset that breaks 16-byte alignment, a transposed
    view and a column stride: all must give the reference's answer."""
    gen, seed = fresh_generator()
    for dtype in LOGIT_DTYPES:
        wide = make_logits(65, 300, dtype, gen).cuda()
        views = {
            "row stride 300": wide[:, :256],
            "offset 1": wide[:, 1:257],
            "offset 8, E=64": wide[:, 8:72],
            "transposed": make_logits(128, 40, dtype, gen).cuda().t(),
            "column stride 2": wide[:, ::2],
        }
        for name, logits in views.items():
            for scoring in SCORINGS:
                groups = group_args(grouping, logits.shape[1], 6)
                weights, ids = run_op(logits, 6, scoring, True, None, groups)
                msg = f"[seed={seed} {dtype} {name} groups={groups}]"
                assert_matches_reference(logits, 6, scoring, True, None, weights, ids, msg, groups)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "num_experts,k,dtype",
    [(513, 8, torch.bfloat16), (600, 1, torch.float32), (1024, 33, torch.float16), (64, 33, torch.float32),
     (64, 64, torch.bfloat16), (256, 8, torch.float64), (40, 40, torch.float32)],
)
def test_out_of_scope_falls_back(kernel, num_experts, k, dtype):
    """E > 512, k > 32 or fp64 logits run the composite path inside the op: same answer
    (bitwise for sigmoid: the same torch operations)."""
    gen, seed = fresh_generator()
    for scoring in SCORINGS:
        for bias_kind in (None, "float32"):
            logits = make_logits(70, num_experts, dtype, gen)
            logits[3, 5:9] = float("nan")
            logits[4, 0] = float("inf")
            check_with_fresh_bias(logits.cuda(), k, scoring, True, bias_kind, UNGROUPED, gen, seed)


@pytest.mark.cuda
def test_more_than_32_groups_fall_back(kernel):
    gen, seed = fresh_generator()
    logits = make_logits(33, 128, torch.float32, gen).cuda()
    for scoring in SCORINGS:
        groups = (64, 8, "top2_sum")
        weights, ids = run_op(logits, 8, scoring, True, None, groups)
        assert_matches_reference(logits, 8, scoring, True, None, weights, ids, f"[seed={seed}]", groups)


# --------------------------------------------------------------------------------- NaN and Inf

NAN, INF = float("nan"), float("inf")


def special_rows(num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """All NaN, part NaN, +Inf, several +Inf, -Inf, all -Inf, all +Inf, mixed, NaN next to
    the maximum, and one ordinary row."""
    rows = torch.randn(12, num_experts, generator=gen)
    pick = lambda frac: torch.rand(num_experts, generator=gen) < frac  # noqa: E731
    rows[0] = NAN
    rows[1][pick(0.5)] = NAN
    rows[2][torch.randint(0, num_experts, (1,), generator=gen)] = INF
    rows[3][pick(0.3)] = INF
    rows[4][pick(0.3)] = -INF
    rows[5] = -INF
    rows[6] = INF
    mixed = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 1.0])
    rows[7] = mixed[torch.randint(0, 6, (num_experts,), generator=gen)]
    rows[8][pick(0.9)] = NAN
    rows[9][0] = NAN
    rows[9][-1] = 1e30
    rows[10] = torch.where(pick(0.5), torch.tensor(-INF), torch.tensor(NAN))
    return rows


@pytest.mark.cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("num_experts", (1, 8, 60, 128, 160, 256, 512))
def test_nan_and_inf(kernel, num_experts, grouping):
    gen, seed = fresh_generator()
    rows = special_rows(num_experts, gen)
    biases = {
        "none": None,
        "finite": torch.randn(num_experts, generator=gen) * 0.1,
        "with nan/inf": torch.where(
            torch.rand(num_experts, generator=gen) < 0.2,
            torch.tensor([NAN, INF, -INF])[torch.randint(0, 3, (num_experts,), generator=gen)],
            torch.randn(num_experts, generator=gen) * 0.1,
        ),
    }
    for dtype in LOGIT_DTYPES:
        logits = rows.to(dtype).cuda()
        for k in ks_for(num_experts):
            groups = group_args(grouping, num_experts, k)
            for scoring in SCORINGS:
                for renormalize in (True, False):
                    for bias_name, bias in biases.items():
                        bias_cuda = None if bias is None else bias.cuda()
                        weights, ids = run_op(logits, k, scoring, renormalize, bias_cuda, groups)
                        msg = f"[seed={seed} E={num_experts} k={k} {dtype} {scoring} renorm={renormalize} bias={bias_name} groups={groups}]"
                        assert_matches_reference(logits, k, scoring, renormalize, bias_cuda, weights, ids, msg, groups)
                        # Row 0 is all NaN: ids 0..k-1, weights exactly 1/k (renormalized) or 0.
                        assert ids[0].cpu().tolist() == list(range(k)), msg
                        expected = torch.full((k,), 1.0 / k if renormalize else 0.0)
                        assert torch.equal(weights[0].cpu(), expected), msg


@pytest.mark.cuda
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_cuda_graph_replay_with_nan_padding(kernel, scoring, with_bias, grouping):
    """A captured call on a static [T_max, E] buffer whose unused rows hold NaN, replayed with
    new contents: real rows match the reference, padding rows get ids 0..k-1 and 1/k."""
    gen, seed = fresh_generator()
    max_tokens, k = 96, 8
    num_experts = 160 if grouping == "grouped_scan" else 256  # 256 has only butterfly groups
    groups = group_args(grouping, num_experts, k)
    static_logits = torch.full((max_tokens, num_experts), NAN, dtype=torch.bfloat16, device="cuda")
    bias = (torch.randn(num_experts, generator=gen) * 0.05).cuda() if with_bias else None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_op(static_logits, k, scoring, True, bias, groups)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_weights, static_ids = run_op(static_logits, k, scoring, True, bias, groups)
    for num_real in (0, 1, 17, 95, 96, 3):
        static_logits.fill_(NAN)
        real = make_logits(num_real, num_experts, torch.bfloat16, gen)
        if num_real > 2:
            real[1, :7] = NAN
            real[2, 3] = INF
        static_logits[:num_real].copy_(real)
        graph.replay()
        torch.cuda.synchronize()
        msg = f"[seed={seed} real rows={num_real} groups={groups}]"
        assert_matches_reference(static_logits, k, scoring, True, bias, static_weights, static_ids, msg, groups)
        padding_ids = static_ids[num_real:].cpu()
        assert bool((padding_ids == torch.arange(k)).all()), msg
        torch.testing.assert_close(static_weights[num_real:].cpu(), torch.full((max_tokens - num_real, k), 1.0 / k))


# --------------------------------------------------------------------- back-to-back launches

CHAIN_KS = (16, 8, 4, 2)


def route_chain(logits, grouping):
    """Each call routes the weights of the call before it: (input, weights, ids, groups) per call."""
    calls = []
    for k in CHAIN_KS:
        groups = group_args(grouping, logits.shape[1], k)
        weights, ids = run_op(logits, k, "softmax", False, None, groups)
        calls.append((logits, weights, ids, groups))
        logits = weights
    return calls


@pytest.mark.cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_back_to_back_calls_read_the_previous_results(kernel, grouping):
    """The kernel is launched with programmatic dependent launch, so a call may start before
    the call it reads from has finished; it must see that call's results, eagerly and in a
    replayed CUDA graph whose buffers still hold the previous replay's values."""
    gen, seed = fresh_generator()
    num_experts = 60 if grouping == "grouped_scan" else 64  # 64 has only butterfly groups
    static_logits = make_logits(4096, num_experts, torch.float32, gen).cuda()
    for logits, weights, ids, groups in route_chain(static_logits, grouping):
        k = weights.shape[1]
        msg = f"[seed={seed} eager k={k} groups={groups}]"
        assert_matches_reference(logits, k, "softmax", False, None, weights, ids, msg, groups)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        route_chain(static_logits, grouping)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls = route_chain(static_logits, grouping)
    for replay in range(3):
        static_logits.copy_(make_logits(4096, num_experts, torch.float32, gen))
        graph.replay()
        torch.cuda.synchronize()
        for logits, weights, ids, groups in calls:
            k = weights.shape[1]
            msg = f"[seed={seed} replay={replay} k={k} groups={groups}]"
            assert_matches_reference(logits, k, "softmax", False, None, weights, ids, msg, groups)


# ---------------------------------------------------------------------------------- bad input


def bad_inputs(device: str):
    logits = torch.randn(4, 8, device=device)
    return [
        ((logits, 9, "softmax", True, None), "k > E"),
        ((logits, 0, "softmax", True, None), "k = 0"),
        ((logits, -2, "sigmoid", True, None), "k < 0"),
        ((torch.randint(0, 5, (4, 8), device=device), 2, "softmax", True, None), "int logits"),
        ((torch.randn(8, device=device), 2, "softmax", True, None), "1-D logits"),
        ((torch.randn(2, 4, 8, device=device), 2, "softmax", True, None), "3-D logits"),
        ((torch.randn(4, 0, device=device), 1, "softmax", True, None), "no experts"),
        ((logits, 2, "relu", True, None), "unknown scoring"),
        ((logits, 2, "it's", True, None), "scoring with a quote"),
        ((logits, 2, "softmax", True, torch.zeros(7, device=device)), "bias shape"),
        ((logits, 2, "softmax", True, torch.zeros(8, dtype=torch.int32, device=device)), "bias dtype"),
        ((logits, 2, "sigmoid", True, None, 0, 1, "top2_sum"), "n_group = 0"),
        ((logits, 2, "sigmoid", True, None, 3, 1, "top2_sum"), "E not divisible by n_group"),
        ((logits, 2, "sigmoid", True, None, 4, 5, "top2_sum"), "topk_group > n_group"),
        ((logits, 2, "sigmoid", True, None, 4, 0, "top2_sum"), "topk_group = 0"),
        ((logits, 5, "sigmoid", True, None, 4, 2, "top2_sum"), "k > kept experts"),
        ((logits, 2, "sigmoid", True, None, 4, 2, "sum"), "unknown group score"),
    ]


@pytest.mark.cuda
def test_bad_inputs_raise_value_error_like_the_reference(kernel):
    for (cpu_args, name), (cuda_args, _) in zip(bad_inputs("cpu"), bad_inputs("cuda")):
        with pytest.raises(ValueError) as cpu_error:
            torch.ops.fusion_passes.topk_routing(*cpu_args)
        with pytest.raises(ValueError) as cuda_error:
            torch.ops.fusion_passes.topk_routing(*cuda_args)
        assert str(cpu_error.value) in str(cuda_error.value), name
    with pytest.raises(ValueError, match="another device"):
        torch.ops.fusion_passes.topk_routing(torch.randn(4, 8, device="cuda"), 2, "softmax", True, torch.zeros(8))


# -------------------------------------------------------------------------------- group shapes

# (E, n_group, topk_group): DeepSeek-V3, and shapes that are not a power of two of whole lanes
# (scanning path) next to aligned ones (butterfly path): groups smaller than a lane's experts,
# groups that straddle lanes, single-expert groups, 32 groups.
GROUP_SHAPES = (
    (256, 8, 4), (160, 5, 2), (160, 10, 4), (160, 32, 8), (384, 12, 4), (384, 24, 6), (384, 32, 8),
    (512, 2, 1), (512, 32, 4), (500, 25, 5), (96, 32, 8), (60, 3, 2), (33, 3, 1), (30, 30, 10), (5, 5, 2),
)


@pytest.mark.cuda
@pytest.mark.parametrize("num_experts,n_group,topk_group", GROUP_SHAPES)
def test_group_shapes(kernel, num_experts, n_group, topk_group):
    """Every dtype, scoring, bias kind and renormalization on this group shape, the group
    score alternating, with NaN rows, NaN members and +Inf; k up to 16."""
    gen, seed = fresh_generator()
    kept_experts = topk_group * (num_experts // n_group)
    ks = sorted({k for k in (1, 2, 8, 16) if k <= kept_experts} | {min(kept_experts, 16)})
    for dtype in LOGIT_DTYPES:
        logits = make_logits(37, num_experts, dtype, gen)
        logits[0] = NAN
        logits[1, : num_experts // 2] = NAN
        logits[2, :: max(1, num_experts // n_group)] = INF
        logits = logits.cuda()
        cases = itertools.product(ks, SCORINGS, (True, False), BIAS_KINDS)
        for case, (k, scoring, renormalize, bias_kind) in enumerate(cases):
            groups = (n_group, topk_group, ("top2_sum", "max")[case % 2])
            check_with_fresh_bias(logits, k, scoring, renormalize, bias_kind, groups, gen, seed)


# ------------------------------------------------------------ group terms of probabilities

# (E, n_group, topk_group): the butterfly group path (6/3, 256/8, 64/32) and the scanning one
# (9/3, 160/5, 160/32); see butterfly_groups.
PROBABILITY_GROUP_SHAPES = ((6, 3, 2), (9, 3, 2), (256, 8, 4), (160, 5, 2), (64, 32, 8), (160, 32, 8))
# Where the levels of near_tie_group_rows lie: for softmax t = level - row max (across the -87
# floor, where exp rounds neighbours alike near 0, anywhere); for sigmoid the level itself
# (subnormal results, near 0, where it rounds to about 1, anywhere).
SOFTMAX_SHIFTS = ((-87.5, -86.5), (-1e-3, 0.0), (-2.0, 0.0), (-90.0, 0.0))
SIGMOID_LEVELS = ((-89.0, -86.0), (-1e-3, 1e-3), (8.0, 17.0), (-95.0, 20.0))


def near_tie_group_rows(num_tokens: int, num_experts: int, n_group: int, scoring: str, gen) -> torch.Tensor:
    """Rows whose groups differ only in how their probability terms round: every expert at a
    floor whose term is 0, expert 0 at the row max, and in each group a best expert a few fp32
    ulps from a level the row shares, its second best too or at the floor. By the logits the
    group of the largest bits would win; by the terms, groups tie wherever exp (or sigmoid)
    rounds neighbouring inputs alike, so the kernel keeps the reference's groups only if its
    terms are the reference's bits."""
    size = num_experts // n_group
    ranges = torch.tensor(SOFTMAX_SHIFTS if scoring == "softmax" else SIGMOID_LEVELS)
    lo, hi = ranges[torch.randint(0, len(ranges), (num_tokens,), generator=gen)].unbind(1)
    drawn = (lo + (hi - lo) * torch.rand(num_tokens, generator=gen)).unsqueeze(1)
    if scoring == "softmax":
        row_max = torch.randn(num_tokens, 1, generator=gen) * 4
        level = row_max + drawn
    else:
        level = drawn
        row_max = level + 3 * torch.rand(num_tokens, 1, generator=gen)
    logits = torch.full((num_tokens, num_experts), -1e30)
    members = min(2, size)
    for group in range(n_group):
        ulps = torch.randint(-3, 4, (num_tokens, members), dtype=torch.int32, generator=gen)
        near = (level.view(torch.int32) + ulps).view(torch.float32)
        if members == 2:
            near[:, 1] = torch.where(torch.rand(num_tokens, generator=gen) < 0.5, near[:, 1], -1e30)
        slots = torch.rand(num_tokens, size, generator=gen).argsort(dim=1)[:, :members]
        logits.scatter_(1, group * size + slots, near)
    logits[:, :1] = row_max
    return logits


@pytest.mark.cuda
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("num_experts,n_group,topk_group", PROBABILITY_GROUP_SHAPES)
def test_top2_sum_without_a_bias_keeps_the_reference_groups(kernel, num_experts, n_group, topk_group, scoring):
    """Groups ranked by the sum of their two best probabilities (sigmoid, or softmax's
    numerators): near ties of every kind, on the butterfly and the scanning path; ids bitwise."""
    gen, seed = fresh_generator()
    groups = (n_group, topk_group, "top2_sum")
    k = min(8, topk_group * (num_experts // n_group))
    for dtype in LOGIT_DTYPES:
        logits = near_tie_group_rows(4096, num_experts, n_group, scoring, gen).to(dtype).cuda()
        for renormalize in (True, False):
            weights, ids = run_op(logits, k, scoring, renormalize, None, groups)
            msg = f"[seed={seed} E={num_experts} k={k} {dtype} {scoring} renorm={renormalize} groups={groups}]"
            assert_matches_reference(logits, k, scoring, renormalize, None, weights, ids, msg, groups)


# -------------------------------------------------------------------------- sigmoid like torch


def every_16_bit_value(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("source", ("bfloat16", "float16", "float32"))
def test_sigmoid_is_torch_sigmoid_bitwise(kernel, source):
    """p of the kernel (k = E = 32, no renormalization; with no bias and with a zero bias, the
    two paths that compute it) is torch.sigmoid on CUDA of the clamped fp32 logit, bitwise, for
    every bf16, fp16 and fp32 value (NaN: p = 0). Every fp32 value: the kernel's division-free
    reciprocal claims div.rn's bits for every sigmoid denominator in [1, 2^126), and its
    fallback takes the rest (x < -87.3, subnormal p)."""
    chunk = 2**26
    starts = range(-(2**31), 2**31, chunk) if source == "float32" else (None,)
    for start in starts:
        if start is None:
            values = every_16_bit_value(getattr(torch, source)).cuda()
        else:
            values = torch.arange(start, start + chunk, dtype=torch.int64, device="cuda").to(torch.int32)
            values = values.view(torch.float32)
        logits = values.reshape(-1, 32)
        x = _clamp_infinities(logits)
        expected = torch.sigmoid(x).masked_fill(torch.isnan(x), 0.0)
        for bias in (None, torch.zeros(32, device="cuda")):
            weights, ids = run_op(logits, 32, "sigmoid", False, bias)
            probs = torch.zeros_like(weights).scatter_(1, ids, weights)
            assert_bitwise_equal(probs, expected, "p", f"[{source} from bits {start} bias={bias is not None}]")


# ----------------------------------------------------------------------- sanitizer smoke test


@pytest.mark.cuda
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_smoke_every_kernel_variant(kernel, grouping):
    """A few rows through every instantiated variant (dtype x experts-per-lane bucket x scoring x
    bias), aligned and misaligned, with NaN rows: small enough to run under compute-sanitizer."""
    gen, seed = fresh_generator()
    for num_experts in (5, 60, 128, 160, 256, 384, 512):
        k = min(num_experts, 8)
        groups = group_args(grouping, num_experts, k)
        for dtype in LOGIT_DTYPES:
            wide = make_logits(6, num_experts + 1, dtype, gen)
            wide[0] = NAN
            wide[1, :3] = NAN
            wide = wide.cuda()
            for logits in (wide[:, :num_experts], wide[:, 1:]):
                for scoring in SCORINGS:
                    for bias_kind in (None, "float32"):
                        check_with_fresh_bias(logits, k, scoring, True, bias_kind, groups, gen, seed)


# ----------------------------------------------------------------------------- property based

PALETTE_SPECIALS = (0.0, -0.0, 1.0, -1.0, 2.5, 30.0, -87.9, -88.5, -100.0, 1e-40, -1e-40, 3e38, -3e38, NAN, INF, -INF)
element = st.one_of(
    st.floats(-20, 20, width=32),
    st.sampled_from(PALETTE_SPECIALS),
    st.floats(width=32),  # anything: NaN, +-Inf, subnormals, huge
)


@st.composite
def kernel_cases(draw):
    """Logits picked at random from a small drawn palette (ties and special values) mixed
    with Gaussian noise, so that hypothesis explores values while E and T stay large."""
    num_experts = draw(st.sampled_from((1, 2, 3, 8, 31, 32, 33, 60, 64, 100, 128, 160, 193, 256, 300, 384, 500, 512)))
    n_group = draw(st.sampled_from([d for d in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 32) if num_experts % d == 0]))
    topk_group = draw(st.integers(1, n_group))
    groups = (n_group, topk_group, draw(st.sampled_from(("top2_sum", "max"))))
    k = draw(st.integers(1, min(topk_group * (num_experts // n_group), 32)))
    num_tokens = draw(st.integers(0, 40))
    palette = torch.tensor(draw(st.lists(element, min_size=1, max_size=6)), dtype=torch.float32)
    noise_fraction = draw(st.sampled_from((0.0, 0.5, 1.0)))
    seed = draw(st.integers(0, 2**32 - 1))
    gen = torch.Generator().manual_seed(seed)
    picks = palette[torch.randint(0, len(palette), (num_tokens, num_experts), generator=gen)]
    noise = torch.randn(num_tokens, num_experts, generator=gen) * 3
    logits = torch.where(torch.rand(num_tokens, num_experts, generator=gen) < noise_fraction, noise, picks)
    dtype = draw(st.sampled_from(LOGIT_DTYPES))
    bias = None
    if draw(st.booleans()):
        bias_palette = torch.tensor(draw(st.lists(element, min_size=1, max_size=4)), dtype=torch.float32)
        bias = torch.where(
            torch.rand(num_experts, generator=gen) < 0.5,
            torch.randn(num_experts, generator=gen) * 0.05,
            bias_palette[torch.randint(0, len(bias_palette), (num_experts,), generator=gen)],
        )
    return logits.to(dtype), k, draw(st.sampled_from(SCORINGS)), draw(st.booleans()), bias, groups


@pytest.mark.cuda
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=kernel_cases())
def test_kernel_matches_reference_fuzzed(kernel, case):
    logits, k, scoring, renormalize, bias, groups = case
    logits = logits.cuda()
    bias = None if bias is None else bias.cuda()
    weights, ids = run_op(logits, k, scoring, renormalize, bias, groups)
    assert_matches_reference(logits, k, scoring, renormalize, bias, weights, ids, f"groups={groups}", groups)


@st.composite
def reference_cases(draw):
    num_experts = draw(st.integers(1, 24))
    num_tokens = draw(st.integers(0, 6))
    k = draw(st.integers(1, num_experts))
    values = draw(st.lists(element, min_size=num_tokens * num_experts, max_size=num_tokens * num_experts))
    logits = torch.tensor(values, dtype=torch.float32).reshape(num_tokens, num_experts)
    logits = logits.to(draw(st.sampled_from(LOGIT_DTYPES)))
    bias = None
    if draw(st.booleans()):
        bias = torch.tensor(draw(st.lists(element, min_size=num_experts, max_size=num_experts)), dtype=torch.float32)
    return logits, k, draw(st.sampled_from(SCORINGS)), draw(st.booleans()), bias


@settings(max_examples=400, deadline=None)
@given(case=reference_cases())
def test_reference_invariants(case):
    """The reference (on CPU) against the invariants its docstring promises."""
    logits, k, scoring, renormalize, bias = case
    num_tokens, num_experts = logits.shape
    weights, ids = topk_routing_reference(logits, k, scoring, renormalize, bias)
    probs = reference_probs(logits, scoring)
    assert bool(torch.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all())
    valid = ~torch.isnan(logits.float())
    if scoring == "softmax" and num_tokens:
        expected_sum = valid.any(dim=1).double()
        torch.testing.assert_close(probs.double().sum(dim=1), expected_sum, rtol=0, atol=1e-5)
    assert bool((probs[~valid] == 0).all())
    selected_probs = probs.gather(1, ids)
    assert_routing_invariants(weights, ids, num_experts, k, renormalize)
    if not renormalize:
        assert torch.equal(weights, selected_probs)
    elif num_tokens:
        zero_total = selected_probs.sum(dim=1) == 0
        assert bool((weights[zero_total] == torch.tensor(1.0 / k)).all())

    # Order: descending selection score, ties to the lower index, invalid (NaN) ones last
    # in index order; and no unselected expert beats the last selected one.
    keys = selection_keys(logits, probs, bias)
    selected_keys = keys.gather(1, ids)
    if k > 1:
        earlier, later = selected_keys[:, :-1], selected_keys[:, 1:]
        in_order = (earlier > later) | ((earlier == later) & (ids[:, :-1] < ids[:, 1:]))
        assert bool(in_order.all()), (keys, ids)
    unselected = torch.ones_like(keys, dtype=torch.bool).scatter_(1, ids, False)
    last_key, last_id = selected_keys[:, -1:], ids[:, -1:]
    experts = torch.arange(num_experts).expand_as(keys)
    beats_last = (keys > last_key) | ((keys == last_key) & (experts < last_id))
    assert not bool((unselected & beats_last).any()), (keys, ids)
    selectable = keys > float("-inf")  # valid: logit (and score) not NaN
    invalid_selected = ~selectable.gather(1, ids)
    enough_valid = (selectable.sum(dim=1, keepdim=True) >= k).expand_as(ids)
    assert not bool((invalid_selected & enough_valid).any()), "a NaN outranked a valid expert"
