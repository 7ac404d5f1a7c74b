"""CUDA tests of fusion_passes::router_routing: bitwise the two-op composition
topk_routing(router_gemm(...)) for every scoring form and group setting, across the token
counts on both sides of the op's fused/two-kernel bound; against float64 logits; batch
invariance; poisoned padding rows in CUDA-graph replay; the producer -> op -> consumer PDL
chain under HBM load (the router GEMM's stress test, parametrized over the op); concurrent
graphs on four streams; the arrival counters' ring wrapping; bad inputs with the two ops'
messages. Every test runs on both paths of the op, forced: the fused kernel
(csrc/router_routing.cu) wherever it can serve the call, and the two kernels. Inputs are
fresh random numbers on every run; the seed is in every failure message.

Run as a script (``python tests/test_router_routing_cuda.py``) it drives a small workload of the
fused kernel for compute-sanitizer instead (memcheck, racecheck, synccheck)."""

from __future__ import annotations

import functools
import sys

import pytest
import torch
from test_router_gemm_cuda import (
    OPS,
    _bits,
    _inputs,
    _poison_allocator,
    _seed,
    chain_mismatches_under_load,
    replay_concurrently,
)
from test_router_routing import ROUTINGS, bad_inputs

import fusion_passes  # noqa: F401  (registers the ops)
from fusion_passes import kernels

pytestmark = pytest.mark.cuda

# (H, E, routing): the model shapes with their routing, then every setting of ROUTINGS on E = 16.
MODEL_CASES = [
    (2880, 32, (4, "softmax", True, False, 1, 1, "top2_sum")),
    (2880, 128, (4, "softmax", True, False, 1, 1, "top2_sum")),
    (2048, 128, (8, "softmax", True, False, 1, 1, "top2_sum")),
    (7168, 256, (8, "sigmoid", True, True, 8, 4, "top2_sum")),
    (7168, 256, (8, "sigmoid", True, True, 8, 4, "max")),
    (4096, 160, (6, "softmax", False, False, 1, 1, "top2_sum")),
]
SETTING_CASES = [(72, 16, routing) for routing in ROUTINGS]
TOKENS = [1, 2, 7, 16, 17, 64, 128, 129, 256, 1024]


@pytest.fixture(scope="module", autouse=True)
def _kernels_loaded():
    assert kernels.load(), kernels.load_error()


@pytest.fixture(autouse=True, params=["fused", "two_kernels"])
def path(request):
    """The op's path, forced: "fused" runs the fused kernel wherever both kernels serve the
    call (at any T the router GEMM runs its kernel for), "two_kernels" never."""
    OPS._router_routing_set_path(request.param)
    yield request.param
    OPS._router_routing_set_path("auto")
    OPS._router_routing_set_max_tokens(-1)


def make_case(tokens, hidden, experts, routing, dtype, seed):
    x, w, b = _inputs(tokens, hidden, experts, dtype, True, seed)
    k, scoring, renormalize, with_correction, n_group, topk_group, group_score = routing
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    correction = torch.randn(experts, generator=gen, device="cuda") * 0.1 if with_correction else None
    return x, w, b, (k, scoring, renormalize, correction, n_group, topk_group, group_score)


def two_ops(x, w, b, routing_args, logits_dtype=None):
    return OPS.topk_routing(OPS.router_gemm(x, w, b, logits_dtype), *routing_args)


def assert_same(got, want, context):
    (weights, ids), (want_weights, want_ids) = got, want
    assert torch.equal(ids, want_ids), f"ids differ ({context})"
    assert torch.equal(_bits(weights), _bits(want_weights)), f"weights differ bitwise ({context})"


@pytest.mark.parametrize("logits_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "case", MODEL_CASES + SETTING_CASES, ids=lambda c: f"H{c[0]}xE{c[1]}-{c[2][1]}-k{c[2][0]}-g{c[2][4]}-{c[2][6]}"
)
def test_bitwise_the_two_ops(case, dtype, logits_dtype):
    hidden, experts, routing = case
    seed = _seed()
    for tokens in TOKENS:
        x, w, b, routing_args = make_case(tokens, hidden, experts, routing, dtype, seed + tokens)
        _poison_allocator(tokens * routing_args[0] * 8)  # rows the op failed to write would show
        got = OPS.router_routing(x, w, b, *routing_args, logits_dtype)
        assert_same(got, two_ops(x, w, b, routing_args, logits_dtype), f"T={tokens} seed={seed}")


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: f"H{c[0]}xE{c[1]}-g{c[2][4]}")
def test_against_float64_logits(case):
    """Rows whose logits, computed in float64 and rounded once to bf16, equal the op's
    (all but the rare logit within the fp32 accumulation error of a rounding boundary)
    route exactly as topk_routing routes those float64 logits."""
    hidden, experts, routing = case
    seed = _seed()
    x, w, b, routing_args = make_case(64, hidden, experts, routing, torch.bfloat16, seed)
    weights, ids = OPS.router_routing(x, w, b, *routing_args, None)
    exact = (x.double() @ w.double().t() + b.double()).to(torch.bfloat16)
    want_weights, want_ids = OPS.topk_routing(exact, *routing_args)
    agree = (OPS.router_gemm(x, w, b, None) == exact).all(dim=1)
    assert agree.sum() >= 32, f"only {int(agree.sum())} of 64 rows of logits are the float64 ones rounded (seed={seed})"
    assert_same((weights[agree], ids[agree]), (want_weights[agree], want_ids[agree]), f"seed={seed}")


@pytest.mark.parametrize("case", MODEL_CASES[:4], ids=lambda c: f"H{c[0]}xE{c[1]}")
def test_batch_invariance(case):
    """A token's weights and ids do not depend on T or on where the row sits."""
    hidden, experts, routing = case
    seed = _seed()
    x, w, b, routing_args = make_case(300, hidden, experts, routing, torch.bfloat16, seed)
    alone = [OPS.router_routing(x[i : i + 1], w, b, *routing_args, None) for i in (0, 5, 150, 299)]
    for tokens in (8, 16, 64, 128, 300):
        weights, ids = OPS.router_routing(x[:tokens], w, b, *routing_args, None)
        for row, (w1, i1) in zip((0, 5, 150, 299), alone):
            if row < tokens:
                assert_same((weights[row : row + 1], ids[row : row + 1]), (w1, i1), f"T={tokens} row={row} seed={seed}")


@pytest.mark.parametrize("case", [MODEL_CASES[1], MODEL_CASES[3]], ids=lambda c: f"H{c[0]}xE{c[1]}")
def test_cuda_graph_with_poisoned_padding(case):
    """Captured at T = 128; replayed with only the first rows live and the padding rows
    garbage and NaN bit patterns: the live rows equal eager calls, every row gets k distinct
    ids and finite weights."""
    hidden, experts, routing = case
    seed = _seed()
    x, w, b, routing_args = make_case(128, hidden, experts, routing, torch.bfloat16, seed)
    k = routing_args[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OPS.router_routing(x, w, b, *routing_args, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = OPS.router_routing(x, w, b, *routing_args, None)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for live in (1, 5, 64, 127):
        x_live, _, _ = _inputs(live, hidden, experts, torch.bfloat16, True, seed + live)
        x[:live].copy_(x_live)
        garbage = _bits(x[live:])
        garbage.copy_(torch.randint(-(2**15), 2**15, garbage.shape, generator=gen, device="cuda", dtype=torch.int16))
        garbage[:, ::5] = 0x7FC0  # NaN
        graph.replay()
        context = f"live={live} seed={seed}"
        assert_same((weights[:live], ids[:live]), OPS.router_routing(x_live, w, b, *routing_args, None), context)
        assert torch.isfinite(weights).all() and (weights >= 0).all(), context
        assert all(len(set(row)) == k for row in ids.tolist()), context


@pytest.mark.parametrize("output", ["weights", "ids"])
@pytest.mark.parametrize("case", [MODEL_CASES[0], MODEL_CASES[2], MODEL_CASES[3]], ids=lambda c: f"H{c[0]}xE{c[1]}")
@pytest.mark.parametrize("neighbours", ["pdl", "torch"])
def test_chain_in_graph_under_memory_pressure(neighbours, case, output):
    """The router GEMM's PDL stress test with this op in the middle: no wrong weight or id
    in 10,000 replays under HBM load on another stream."""
    hidden, experts, routing = case
    seed = _seed()
    variants = torch.stack([_inputs(16, hidden, experts, torch.bfloat16, False, seed + i)[0] for i in range(3)])
    _, w, b, routing_args = make_case(16, hidden, experts, routing, torch.bfloat16, seed)

    def op(x):
        weights, ids = OPS.router_routing(x, w, b, *routing_args, None)
        return weights if output == "weights" else ids.view(torch.int32)  # 4-byte elements for the consumer

    mismatches, nans = chain_mismatches_under_load(op, variants, neighbours, seed=seed)
    assert (mismatches, nans) == (0, 0), f"{mismatches} mismatching and {nans} NaN {output} (seed={seed})"


@pytest.mark.parametrize("index", range(len(bad_inputs())))
def test_bad_inputs_get_the_two_ops_messages(index):
    x, w, b, routing_args = make_case(5, 40, 16, (2, "sigmoid", True, True, 1, 1, "top2_sum"), torch.bfloat16, 0)
    k, scoring, renormalize, correction, n_group, topk_group, group_score = routing_args
    good = dict(
        x=x, weight=w, bias=b, k=k, scoring=scoring, renormalize=renormalize, correction_bias=correction,
        n_group=n_group, topk_group=topk_group, group_score=group_score, logits_dtype=None,
    )  # fmt: skip
    overrides, op = bad_inputs()[index]
    overrides = {name: v.cuda() if isinstance(v, torch.Tensor) else v for name, v in overrides.items()}
    with pytest.raises(ValueError, match=f"^{op}:"):
        OPS.router_routing(*{**good, **overrides}.values())


@pytest.mark.parametrize("logits_dtype", [None, torch.float32])
def test_strided_and_single_rows(logits_dtype):
    """Aligned strided rows of x, a row stride of 0 (expanded) and T = 1 with any stride: the
    fused kernel reads x as the router GEMM kernel does."""
    seed = _seed()
    hidden, experts, routing = MODEL_CASES[1]
    _, w, b, routing_args = make_case(1, hidden, experts, routing, torch.bfloat16, seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(24, hidden + 16, generator=gen, device="cuda").to(torch.bfloat16)
    for name, x in [
        ("strided", base[:, 8 : 8 + hidden]),
        ("expanded", base[:1, :hidden].expand(9, hidden)),
        ("one row", base[3:4, 8 : 8 + hidden]),
    ]:
        got = OPS.router_routing(x, w, b, *routing_args, logits_dtype)
        assert_same(got, two_ops(x, w, b, routing_args, logits_dtype), f"{name} seed={seed}")


def _kernel_names(call):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("case", MODEL_CASES[:4], ids=lambda c: f"H{c[0]}xE{c[1]}-g{c[2][4]}")
def test_the_path_runs_its_kernels(case, path):
    """Forced fused: one kernel, router_routing_kernel. Two kernels: the router GEMM's and
    the routing's. Automatic: fused up to _router_routing_fused_max_tokens, then two kernels."""
    hidden, experts, routing = case
    x, w, b, routing_args = make_case(16, hidden, experts, routing, torch.bfloat16, _seed())
    names = _kernel_names(lambda: OPS.router_routing(x, w, b, *routing_args, None))
    if path == "fused":
        assert len(names) == 1 and "router_routing_kernel" in names[0], names
    else:
        assert any("router_gemm_kernel" in n for n in names) and any("topk_routing_kernel" in n for n in names)
        assert not any("router_routing_kernel" in n for n in names), names
    OPS._router_routing_set_path("auto")
    bound = OPS._router_routing_fused_max_tokens(hidden, experts)
    assert 8 <= bound <= OPS._router_gemm_kernel_max_tokens(hidden, experts)
    x, w, b, routing_args = make_case(bound + 1, hidden, experts, routing, torch.bfloat16, _seed())
    for tokens, fused in ((bound, True), (bound + 1, False)):
        names = _kernel_names(lambda: OPS.router_routing(x[:tokens], w, b, *routing_args, None))
        assert any("router_routing_kernel" in n for n in names) == fused, f"T={tokens} bound={bound}: {names}"


def test_fused_bound_settings():
    OPS._router_routing_set_path("auto")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # One wave of two CTAs an SM: clusters of 8 CTAs (H = 2880) x 8 tiles of 16 experts, 8 tokens a tile.
    one_wave = 8 * (2 * sms // 64)
    gemm_bound = OPS._router_gemm_kernel_max_tokens(2880, 128)
    assert OPS._router_routing_fused_max_tokens(2880, 128) == min(one_wave, gemm_bound)
    OPS._router_routing_set_max_tokens(24)
    assert OPS._router_routing_fused_max_tokens(2880, 128) == 24
    OPS._router_routing_set_max_tokens(10_000)
    assert OPS._router_routing_fused_max_tokens(2880, 128) == OPS._router_gemm_kernel_max_tokens(2880, 128)
    with pytest.raises(ValueError, match="max_tokens"):
        OPS._router_routing_set_max_tokens(-2)
    with pytest.raises(ValueError, match="path must be one of"):
        OPS._router_routing_set_path("both")


def test_arrival_counters_wrap_around():
    """Thousands of calls of mixed T take the ring of arrival counters (2**14, one per 8 tokens
    a call, each left at zero) around twice: every call still routes every row, bitwise as
    the two ops."""
    seed = _seed()
    hidden, experts, routing = MODEL_CASES[0]
    token_counts = (1, 64, 128)  # 1, 8 and 16 counters; 128 is within the fused bound of 2880x32
    x, w, b, routing_args = make_case(max(token_counts), hidden, experts, routing, torch.bfloat16, seed)
    want = [two_ops(x[:t], w, b, routing_args) for t in token_counts]
    calls = 3 * (2 * 2**14 // sum(t // 8 or 1 for t in token_counts) + 1)
    kept = []
    for i in range(calls):
        out = OPS.router_routing(x[: token_counts[i % 3]], w, b, *routing_args, None)
        if i % 97 == 0 or i >= calls - 3:
            kept.append((i % 3, out))
    for which, out in kept:
        assert_same(out, want[which], f"T={token_counts[which]} seed={seed}")


def test_concurrent_graphs_on_four_streams():
    """Four graphs of 50 calls each (the model shapes, different T), replayed at the same time
    on four streams, 20 times: the calls share the SMs and the counter ring without disturbing
    each other. Every output equals its eager value bitwise."""
    seed = _seed()
    calls_per_graph = 50
    work = []
    for i, (hidden, experts, routing) in enumerate(MODEL_CASES[:4]):
        tokens = (1, 16, 9, 3)[i]
        seeds = [seed + 100 * i + c for c in range(calls_per_graph)]
        cases = [make_case(tokens, hidden, experts, routing, torch.bfloat16, s) for s in seeds]
        expected = [OPS.router_routing(x, w, b, *args, None) for x, w, b, args in cases]
        work.append((cases, expected))
    call_lists = [
        [functools.partial(OPS.router_routing, x, w, b, *args, None) for x, w, b, args in cases] for cases, _ in work
    ]
    for outs in replay_concurrently(call_lists, replays=20):
        for i, (_, expected) in enumerate(work):
            for c in range(calls_per_graph):
                assert_same(outs[i][c], expected[c], f"shape {MODEL_CASES[i][:2]} call {c} seed={seed}")


def sanitizer_workload() -> int:
    """Every routing setting and the model shapes at a few T through the fused kernel (forced),
    each bitwise against the two kernels; a CUDA graph with the counter ring in use."""
    assert kernels.load(), kernels.load_error()
    failures = calls = 0
    for hidden, experts, routing in MODEL_CASES + SETTING_CASES:
        for tokens in (1, 9, 33):
            for logits_dtype in (None, torch.float32):
                seed = _seed()
                x, w, b, routing_args = make_case(tokens, hidden, experts, routing, torch.bfloat16, seed)
                OPS._router_routing_set_path("two_kernels")
                want = OPS.router_routing(x, w, b, *routing_args, logits_dtype)
                OPS._router_routing_set_path("fused")
                got = OPS.router_routing(x, w, b, *routing_args, logits_dtype)
                calls += 1
                try:
                    assert_same(got, want, f"H={hidden} E={experts} {routing} T={tokens} {logits_dtype} seed={seed}")
                except AssertionError as exc:
                    failures += 1
                    print("FAIL", exc)
    hidden, experts, routing = MODEL_CASES[1]
    x, w, b, routing_args = make_case(16, hidden, experts, routing, torch.bfloat16, _seed())
    want = OPS.router_routing(x, w, b, *routing_args, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [OPS.router_routing(x, w, b, *routing_args, None) for _ in range(4)]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for out in outs:
        calls += 1
        try:
            assert_same(out, want, "graph replay")
        except AssertionError as exc:
            failures += 1
            print("FAIL", exc)
    OPS._router_routing_set_path("auto")
    print(f"sanitizer workload: {calls} checked calls, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(sanitizer_workload())
