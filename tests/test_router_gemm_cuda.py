"""CUDA tests of fusion_passes::router_gemm (csrc/router_gemm.cu).

Accuracy against a float64 reference, bitwise batch invariance, CUDA graphs with garbage
rows, a producer -> router GEMM -> consumer chain replayed under memory pressure (with
and without programmatic-dependent-launch neighbours), bad and unusual inputs, and the
run-time settings. Inputs are fresh random numbers on every run; the seed is in every
failure message.

Run as a script (``python tests/test_router_gemm_cuda.py``) it drives a small workload for
compute-sanitizer instead (memcheck, racecheck, synccheck).
"""

from __future__ import annotations

import functools
import random
import sys

import pytest
import torch

import fusion_passes  # noqa: F401  (registers the ops)
from fusion_passes import kernels

pytestmark = pytest.mark.cuda

OPS = torch.ops.fusion_passes
MODEL_SHAPES = [(2880, 32), (2880, 128), (2048, 128), (7168, 256), (4096, 8)]  # (H, E)
ODD_SHAPES = [(h, e) for h in (8, 72) for e in (1, 3, 17)]
TOKENS = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 1024, 8192]
TILE_SHAPES = [(1, 1), (1, 2), (2, 4), (2, 8)]
ALL_TOKENS_TO_KERNEL = 1 << 30


def _accumulation_tol(hidden: int) -> float:
    """fp32 accumulation allowance, relative to the sum of |x * w|: (16 + 2 sqrt(H)) units of
    fp32 rounding (cuBLAS's long K loops reach about 16 units at H = 7168)."""
    return (16 + 2 * hidden**0.5) * 2.0**-24


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _inputs(tokens, hidden, experts, dtype, with_bias, seed, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    w = (torch.randn(experts, hidden, generator=gen, device=device) * 0.1).to(dtype)
    b = torch.randn(experts, generator=gen, device=device).to(dtype) if with_bias else None
    return x, w, b


def _poison_allocator(nbytes: int) -> None:
    """Leave a block of all-ones bytes (NaN in every float dtype) in the caching
    allocator, so that an output of that size most likely lands on it."""
    if nbytes:
        torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")


def _call(x, w, b=None, out_dtype=None):
    dtype = out_dtype or x.dtype
    _poison_allocator(x.shape[0] * w.shape[0] * torch.empty((), dtype=dtype).element_size())
    return OPS.router_gemm(x, w, b, out_dtype)


def _ulp(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |value| (float64 in, float64 out)."""
    finfo = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(value.abs().clamp_min(finfo.smallest_normal)))
    return finfo.eps * torch.exp2(exponent)


def _assert_one_rounding(out, x, w, b, out_dtype, context):
    """|out - exact| <= one ulp of the output dtype at the exact value, plus the fp32
    accumulation allowance. NaN never passes."""
    assert out.dtype == out_dtype, context
    assert out.shape == (x.shape[0], w.shape[0]), context
    assert not torch.isnan(out).any(), f"NaN in the output ({context})"
    exact = x.double() @ w.double().t()
    magnitude = x.double().abs() @ w.double().abs().t()
    if b is not None:
        exact = exact + b.double()
        magnitude = magnitude + b.double().abs()
    err = (out.double() - exact).abs()
    tol = _ulp(exact, out_dtype) + _accumulation_tol(x.shape[1]) * magnitude
    bad = err > tol
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{int(bad.sum())} of {out.numel()} outputs off by more than one rounding ({context}); "
            f"first at {idx}: got {out[idx].item()!r}, exact {exact[idx].item()!r}, tol {tol[idx].item()!r}"
        )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_bitwise(a, b, context):
    assert a.shape == b.shape and a.dtype == b.dtype, context
    if not torch.equal(_bits(a), _bits(b)):
        diff = (_bits(a) != _bits(b)).nonzero()
        raise AssertionError(f"{diff.shape[0]} outputs differ bitwise ({context}); first at {diff[0].tolist()}")


@pytest.fixture(scope="module", autouse=True)
def _kernels_loaded():
    assert kernels.load(), kernels.load_error()
    assert kernels.has_cuda_kernel("router_gemm")


@pytest.fixture(autouse=True)
def _restore_settings():
    bf16_rr = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    fp16_rr = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    # The cuBLAS path rounds once only without reduced-precision reductions.
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    yield
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = bf16_rr
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = fp16_rr
    OPS._router_gemm_set_max_tokens(-1)
    OPS._router_gemm_set_tiles(-1, -1)
    OPS._router_gemm_set_release_at_start(True)
    OPS._router_gemm_set_ctas_per_sm(1)


# ------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("path", ["default", "kernel"])
@pytest.mark.parametrize("out_dtype", ["input", torch.float32])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", MODEL_SHAPES + ODD_SHAPES, ids=lambda s: f"H{s[0]}xE{s[1]}")
def test_matches_float64_reference(shape, dtype, with_bias, out_dtype, path):
    """Every T of the list, through the op's own choice of kernel or cuBLAS ("default")
    and through the kernel at every T ("kernel")."""
    hidden, experts = shape
    out_dtype = dtype if out_dtype == "input" else out_dtype
    if path == "kernel":
        OPS._router_gemm_set_max_tokens(ALL_TOKENS_TO_KERNEL)
    for tokens in TOKENS:
        seed = _seed()
        x, w, b = _inputs(tokens, hidden, experts, dtype, with_bias, seed)
        out = _call(x, w, b, out_dtype)
        _assert_one_rounding(out, x, w, b, out_dtype, f"T={tokens} H={hidden} E={experts} seed={seed}")


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_cross_half_precision_output(dtype, out_dtype):
    for tokens in (1, 16, 100, 1024):
        seed = _seed()
        x, w, b = _inputs(tokens, 2880, 128, dtype, True, seed)
        _assert_one_rounding(_call(x, w, b, out_dtype), x, w, b, out_dtype, f"T={tokens} seed={seed}")


def test_every_tile_shape_matches_reference_and_each_other():
    OPS._router_gemm_set_max_tokens(ALL_TOKENS_TO_KERNEL)
    for hidden, experts in [(2880, 32), (7168, 256), (72, 17), (4096, 8)]:
        for tokens in (1, 9, 70, 300):
            seed = _seed()
            x, w, b = _inputs(tokens, hidden, experts, torch.bfloat16, True, seed)
            auto = _call(x, w, b)
            ctx = f"T={tokens} H={hidden} E={experts} seed={seed}"
            _assert_one_rounding(auto, x, w, b, torch.bfloat16, ctx)
            for m_tiles, n_tiles in TILE_SHAPES:
                OPS._router_gemm_set_tiles(m_tiles, n_tiles)
                _assert_bitwise(_call(x, w, b), auto, f"tiles {m_tiles}x{n_tiles} {ctx}")
            OPS._router_gemm_set_tiles(-1, -1)


# ---------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", MODEL_SHAPES + [(72, 3), (8, 17)], ids=lambda s: f"H{s[0]}xE{s[1]}")
def test_batch_invariance(shape, dtype, with_bias, out_dtype):
    """Each row equals that row computed alone (T=1), also at other row positions and in
    sub-batches, for every T in the list, with the kernel serving every T."""
    hidden, experts = shape
    OPS._router_gemm_set_max_tokens(ALL_TOKENS_TO_KERNEL)
    for tokens in [t for t in TOKENS if t > 0]:
        seed = _seed()
        x, w, b = _inputs(tokens, hidden, experts, dtype, with_bias, seed)
        ctx = f"T={tokens} H={hidden} E={experts} seed={seed}"
        full = _call(x, w, b, out_dtype)
        rng = random.Random(seed)
        rows = sorted({0, tokens - 1, tokens // 2, rng.randrange(tokens)})
        for r in rows:
            _assert_bitwise(_call(x[r : r + 1], w, b, out_dtype), full[r : r + 1], f"row {r} alone, {ctx}")
        perm = torch.randperm(tokens, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        _assert_bitwise(_call(x[perm], w, b, out_dtype), full[perm], f"rows permuted, {ctx}")
        lo = rng.randrange(tokens)
        hi = rng.randrange(lo, tokens) + 1
        _assert_bitwise(_call(x[lo:hi], w, b, out_dtype), full[lo:hi], f"rows {lo}:{hi}, {ctx}")


@pytest.mark.parametrize("max_tokens", [-1, 40])
@pytest.mark.parametrize("shape", [(2880, 128), (7168, 256)], ids=lambda s: f"H{s[0]}xE{s[1]}")
def test_kernel_serves_up_to_its_bound_then_cublas(shape, max_tokens):
    """The automatic shape-aware bound (-1) and a plain bound on T."""
    from torch.profiler import ProfilerActivity, profile

    OPS._router_gemm_set_max_tokens(max_tokens)
    hidden, experts = shape
    bound = OPS._router_gemm_kernel_max_tokens(hidden, experts)
    assert bound == (40 if max_tokens == 40 else min(512, 60_000_000 // (hidden * experts)))
    x, w, b = _inputs(bound + 1, hidden, experts, torch.bfloat16, True, _seed())

    def kernel_names(t):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            OPS.router_gemm(t, w, b, None)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    assert any("router_gemm_kernel" in n for n in kernel_names(x[:bound]))
    assert not any("router_gemm_kernel" in n for n in kernel_names(x))


# --------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("max_tokens", [None, 512])
@pytest.mark.parametrize("shape", [(2880, 128), (7168, 256), (72, 17)], ids=lambda s: f"H{s[0]}xE{s[1]}")
def test_cuda_graph_with_garbage_rows(shape, max_tokens):
    """Capture at the largest T the kernel serves; replay with new contents and only the
    first n rows live, the others garbage and NaN/Inf bit patterns."""
    hidden, experts = shape
    if max_tokens is not None:
        OPS._router_gemm_set_max_tokens(max_tokens)
    t_max = OPS._router_gemm_kernel_max_tokens(hidden, experts)
    seed = _seed()
    x, w, b = _inputs(t_max, hidden, experts, torch.bfloat16, True, seed)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OPS.router_gemm(x, w, b, None)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OPS.router_gemm(x, w, b, None)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    nan_patterns = torch.tensor([0x7FC0, -1, 0x7F80, -128, 0x7FFF], dtype=torch.int16, device="cuda")
    for live in sorted({1, 5, t_max // 2, t_max - 1, t_max}):
        if live == 0:
            continue
        ctx = f"live={live} of {t_max}, H={hidden} E={experts} seed={seed}"
        x_live, w_new, b_new = _inputs(live, hidden, experts, torch.bfloat16, True, seed + live)
        x[:live].copy_(x_live)
        garbage = _bits(x[live:])
        garbage.copy_(torch.randint(-(2**15), 2**15, garbage.shape, generator=gen, device="cuda", dtype=torch.int16))
        garbage[:, ::7] = nan_patterns[torch.arange(garbage[:, ::7].numel(), device="cuda") % 5].view(
            garbage[:, ::7].shape
        )
        w.copy_(w_new)
        b.copy_(b_new)
        graph.replay()
        eager = _call(x_live, w_new, b_new)
        assert not torch.isnan(out[:live]).any(), ctx
        _assert_bitwise(out[:live], eager, ctx)


def _side_load(stream, big_src, big_dst, mat):
    with torch.cuda.stream(stream):
        for _ in range(2):
            big_dst.copy_(big_src)
            torch.mm(mat, mat)


# (H, E, T): the three small model shapes at decode and past the one-wave tiles, 7168x256.
CHAIN_CASES = [(2880, 128, 64), (2880, 32, 1), (2048, 128, 16), (7168, 256, 8)]


def chain_mismatches_under_load(op, variants, neighbours, replays=10_000, seed=0):
    """(mismatches, NaNs) of ``op(x)`` over ``replays`` replays of producer -> op -> consumer,
    captured in one CUDA graph while another stream copies gigabytes and multiplies large
    matrices. The producer cycles x through ``variants`` [P, T, H]; the consumer compares
    ``op(x)`` (one tensor of 2- or 4-byte elements) bitwise with the op's quiet eager result
    for that variant and counts mismatches and NaNs on the device.

    "pdl": the test-only PDL producer (releases its dependents at once, writes x after a
    3 us delay: a deliberately slow producer) and consumer (waits, then reads), so an op
    that read x before its griddepcontrol.wait, or whose dependents could read its output
    before its stores land, gets caught. "torch": plain torch kernels as neighbours."""
    variants_n = variants.shape[0]
    expected = torch.stack([op(v) for v in variants])
    x = torch.empty_like(variants[0])
    step = torch.zeros(1, dtype=torch.int32, device="cuda")
    counters = torch.zeros(2, dtype=torch.int64, device="cuda")

    def chain():
        if neighbours == "pdl":
            OPS._test_pdl_producer(variants, step, x, 3000)
            OPS._test_pdl_consumer(op(x), expected, step, counters)
        else:
            variant = torch.remainder(step.long(), variants_n)
            x.copy_(variants.index_select(0, variant)[0])
            out = op(x)
            want = expected.index_select(0, variant)[0]
            counters[0] += (_bits(out) != _bits(want)).sum()
            counters[1] += torch.isnan(out).sum()
            step.add_(1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert counters.tolist() == [0, 0], f"eager chain: mismatches, NaNs = {counters.tolist()} (seed={seed})"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    step.zero_()
    counters.zero_()

    gen = torch.Generator(device="cuda").manual_seed(seed)
    big_src = torch.empty(512 << 20, dtype=torch.uint8, device="cuda").random_(generator=gen)
    big_dst = torch.empty_like(big_src)
    mat = torch.randn(4096, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    load = torch.cuda.Stream()
    load.wait_stream(torch.cuda.current_stream())
    for _ in range(replays // 100):
        _side_load(load, big_src, big_dst, mat)
        for _ in range(100):
            graph.replay()
    torch.cuda.synchronize()
    assert step.item() == replays
    return tuple(counters.tolist())


@pytest.mark.parametrize("release", ["at_start", "after_last_store"])
@pytest.mark.parametrize("case", CHAIN_CASES, ids=lambda c: f"H{c[0]}xE{c[1]}xT{c[2]}")
@pytest.mark.parametrize("neighbours", ["pdl", "torch"])
def test_chain_in_graph_under_memory_pressure(neighbours, case, release):
    """The router GEMM in chain_mismatches_under_load, releasing its dependents at its
    start (the default) or after its last store: no wrong or NaN logit in 10,000 replays."""
    hidden, experts, tokens = case
    tokens = min(tokens, OPS._router_gemm_kernel_max_tokens(hidden, experts))
    OPS._router_gemm_set_release_at_start(release == "at_start")
    seed = _seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    variants = torch.randn(3, tokens, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(experts, hidden, generator=gen, device="cuda") * 0.1).to(torch.bfloat16)
    b = torch.randn(experts, generator=gen, device="cuda").to(torch.bfloat16)
    mismatches, nans = chain_mismatches_under_load(lambda x: OPS.router_gemm(x, w, b, None), variants, neighbours, seed=seed)
    assert (mismatches, nans) == (0, 0), f"{mismatches} mismatching and {nans} NaN logits (seed={seed})"


# ------------------------------------------------------------ concurrency and capture


def replay_concurrently(call_lists, replays):
    """Captures one CUDA graph per list of calls (no arguments), each on its own stream, then
    replays all of them at the same time on their streams, `replays` times: yields the graphs'
    outputs (a list of call results per graph) after each round, the streams synchronized."""
    streams = [torch.cuda.Stream() for _ in call_lists]
    graphs, outs = [], []
    for calls, stream in zip(call_lists, streams):
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs.append([call() for call in calls])
        graphs.append(graph)
    torch.cuda.synchronize()
    for _ in range(replays):
        for graph, stream in zip(graphs, streams):
            with torch.cuda.stream(stream):
                graph.replay()
        torch.cuda.synchronize()
        yield outs


def test_concurrent_graphs_on_four_streams():
    """Four graphs of 50 router GEMMs each (different shapes, T and inputs), replayed at the
    same time on four streams, 20 times: concurrent launches share the SMs (and their
    clusters' distributed shared memory) and must not disturb each other. Every output
    equals its eager value bitwise."""
    seed = _seed()
    shapes = [(2880, 128, 1), (2880, 32, 16), (2048, 128, 9), (7168, 256, 3)]  # H, E, T
    calls_per_graph = 50
    work = []
    for i, (hidden, experts, tokens) in enumerate(shapes):
        xs, ws = [], []
        for c in range(calls_per_graph):
            x, w, _ = _inputs(tokens, hidden, experts, torch.bfloat16, False, seed + 100 * i + c)
            xs.append(x)
            ws.append(w)
        expected = [OPS.router_gemm(x, w, None, None) for x, w in zip(xs, ws)]
        work.append((xs, ws, expected))
    call_lists = [
        [functools.partial(OPS.router_gemm, x, w, None, None) for x, w in zip(xs, ws)] for xs, ws, _ in work
    ]
    for outs in replay_concurrently(call_lists, replays=20):
        for i, (_, _, expected) in enumerate(work):
            for c in range(calls_per_graph):
                _assert_bitwise(outs[i][c], expected[c], f"shape {shapes[i]} call {c} seed={seed}")


def test_first_call_inside_graph_capture():
    """In a fresh process, the very first router GEMM is inside CUDA-graph capture (global
    mode, torch's default): what the op sets up on first use (the multiprocessor count, the
    kernel's attributes) must be legal during capture. The replay equals eager bitwise."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import torch, fusion_passes
        from fusion_passes import kernels
        assert kernels.load(), kernels.load_error()
        ops = torch.ops.fusion_passes
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(5, 2880, generator=g, device="cuda").bfloat16()
        w = torch.randn(128, 2880, generator=g, device="cuda").bfloat16()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.router_gemm(x, w, None, None)
        graph.replay()
        torch.cuda.synchronize()
        eager = ops.router_gemm(x, w, None, None)
        assert torch.equal(out.view(torch.int16), eager.view(torch.int16)), (out - eager).abs().max()
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


# ----------------------------------------------------------- bad and unusual inputs


def test_bad_inputs_raise_value_error():
    x, w, b = _inputs(4, 64, 8, torch.bfloat16, True, _seed())
    cases = [
        ((x, w.half(), None, None), "weight dtype torch.float16 differs from x dtype torch.bfloat16"),
        ((x, w, b.half(), None), "bias dtype torch.float16 differs"),
        ((x[0], w, None, None), "x must be 2-D"),
        ((x.unsqueeze(0), w, None, None), "x must be 2-D"),
        ((x, w[0], None, None), "weight must be 2-D"),
        ((x[:, :32], w, None, None), "hidden sizes differ"),
        ((x, w, b[:4], None), "bias must be"),
        ((x, w, b.view(2, 4), None), "bias must be"),
        ((x, w, None, torch.int32), "out_dtype torch.int32 is not one of"),
        ((x.double(), w.double(), None, None), "x dtype torch.float64 is not one of"),
        ((x.long(), w.long(), None, None), "x dtype torch.int64 is not one of"),
        ((x, w.cpu(), None, None), "weight is on another device"),
        ((x, w, b.cpu(), None), "bias is on another device"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            OPS.router_gemm(*args)


def _unusual_inputs(tokens, seed):
    """(name, x, w, b): valid inputs the kernel may or may not take; never an error."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    h, e = 2880, 128
    w, b = randn(e, h, scale=0.1), randn(e)
    yield "x[:, 1:] (misaligned, odd row stride)", randn(tokens, h + 1)[:, 1:], w, b
    yield "storage offset, pointer not 16B aligned", randn(tokens * h + 3)[3:].view(tokens, h), w, b
    yield "row stride not a multiple of 8", randn(tokens, h + 4)[:, :h], w, b
    yield "aligned strided rows", randn(tokens, h + 16)[:, 8 : 8 + h], w, b
    yield "expanded x (row stride 0)", randn(1, h).expand(tokens, h), w, b
    yield "transposed weight", randn(tokens, h), randn(h, e, scale=0.1).t(), b
    yield "weight rows misaligned", randn(tokens, h), randn(e * h + 1, scale=0.1)[1:].view(e, h), b
    yield "strided bias", randn(tokens, h), w, randn(2 * e)[::2]
    yield "fp32 inputs", randn(tokens, h, dtype=torch.float32), w.float(), b.float()
    yield "H % 8 != 0", randn(tokens, 2882), randn(e, 2882, scale=0.1), b
    yield "H = 12", randn(tokens, 12), randn(e, 12, scale=0.1), b
    yield "E = 513", randn(tokens, h), randn(513, h, scale=0.1), randn(513)
    yield "E = 1024", randn(tokens, h), randn(1024, h, scale=0.1), None
    yield "H = 0", randn(tokens, 0), randn(e, 0), b
    yield "E = 0", randn(tokens, h), randn(0, h), randn(0)


@pytest.mark.parametrize("tokens", [0, 1, 5, 64, 300])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_unusual_inputs_give_correct_results(tokens, out_dtype):
    seed = _seed()
    for name, x, w, b in _unusual_inputs(tokens, seed):
        odt = out_dtype or x.dtype
        out = _call(x, w, b, out_dtype)
        _assert_one_rounding(out, x, w, b, odt, f"{name}, T={tokens} seed={seed}")


def test_strided_rows_are_batch_invariant():
    seed = _seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(40, 2880 + 16, generator=gen, device="cuda").to(torch.bfloat16)
    x = base[:, 8 : 8 + 2880]
    w = (torch.randn(128, 2880, generator=gen, device="cuda") * 0.1).to(torch.bfloat16)
    full = OPS.router_gemm(x, w, None, None)
    for r in (0, 17, 39):
        _assert_bitwise(OPS.router_gemm(x[r : r + 1], w, None, None), full[r : r + 1], f"row {r} seed={seed}")


# ------------------------------------------------------------------ run-time settings


def test_max_tokens_setting():
    assert OPS._router_gemm_max_tokens() == -1  # the automatic, shape-aware choice
    assert OPS._router_gemm_kernel_max_tokens(2880, 32) >= 128
    assert OPS._router_gemm_kernel_max_tokens(7168, 256) >= 16
    OPS._router_gemm_set_max_tokens(7)
    assert OPS._router_gemm_max_tokens() == 7
    assert OPS._router_gemm_kernel_max_tokens(7168, 256) == 7
    OPS._router_gemm_set_max_tokens(0)
    assert OPS._router_gemm_max_tokens() == 0
    x, w, b = _inputs(3, 2048, 128, torch.bfloat16, True, seed := _seed())
    _assert_one_rounding(_call(x, w, b), x, w, b, torch.bfloat16, f"max_tokens=0 seed={seed}")
    OPS._router_gemm_set_max_tokens(-1)
    assert OPS._router_gemm_max_tokens() == -1
    with pytest.raises(ValueError, match="max_tokens"):
        OPS._router_gemm_set_max_tokens(-2)
    with pytest.raises(ValueError, match="tile shape"):
        OPS._router_gemm_set_tiles(3, 3)


def test_weight_loads_before_wait_give_the_same_bits():
    """The opt-in early weight loads (for weights no running kernel writes) change nothing
    but timing: bitwise the same result as the default, including in the PDL chain."""
    seed = _seed()
    x, w, b = _inputs(9, 2880, 128, torch.bfloat16, True, seed)
    after_wait = _call(x, w, b)
    try:
        OPS._router_gemm_set_weight_loads_before_wait(True)
        _assert_bitwise(_call(x, w, b), after_wait, f"seed={seed}")
        step = torch.zeros(1, dtype=torch.int32, device="cuda")
        counters = torch.zeros(2, dtype=torch.int64, device="cuda")
        variants = x.unsqueeze(0).contiguous()
        x_pdl = torch.empty_like(x)
        OPS._test_pdl_producer(variants, step, x_pdl, 2000)
        OPS._test_pdl_consumer(OPS.router_gemm(x_pdl, w, b, None), after_wait.unsqueeze(0), step, counters)
        assert counters.tolist() == [0, 0], f"PDL chain: mismatches, NaNs = {counters.tolist()} (seed={seed})"
    finally:
        OPS._router_gemm_set_weight_loads_before_wait(False)


@pytest.mark.parametrize("shape", [(2880, 128), (2048, 128), (7168, 256)], ids=lambda s: f"H{s[0]}xE{s[1]}")
def test_bench_variants_give_the_same_bits(shape):
    """The release point and the tile rule's CTAs an SM change timing only."""
    hidden, experts = shape
    seed = _seed()
    OPS._router_gemm_set_max_tokens(ALL_TOKENS_TO_KERNEL)
    for tokens in (1, 16, 64, 128, 256):
        x, w, b = _inputs(tokens, hidden, experts, torch.bfloat16, True, seed + tokens)
        default = _call(x, w, b)
        for release_at_start, ctas_per_sm in ((False, 1), (True, 2), (True, 4)):
            OPS._router_gemm_set_release_at_start(release_at_start)
            OPS._router_gemm_set_ctas_per_sm(ctas_per_sm)
            context = f"T={tokens} release_at_start={release_at_start} ctas_per_sm={ctas_per_sm} seed={seed}"
            _assert_bitwise(_call(x, w, b), default, context)
    with pytest.raises(ValueError, match="ctas_per_sm must be 1, 2 or 4"):
        OPS._router_gemm_set_ctas_per_sm(3)


# ------------------------------------------------------- compute-sanitizer workload


def sanitizer_workload() -> int:
    """A few representative calls for compute-sanitizer: every tile shape, K split over 1
    and 8 CTAs, partial tiles in E, T and H, all output dtypes, and the PDL chain. Checks the
    results against a CPU float64 reference (so that cuBLAS stays out of the way)."""
    assert kernels.load(), kernels.load_error()
    OPS._router_gemm_set_max_tokens(ALL_TOKENS_TO_KERNEL)
    failures = 0
    calls = 0

    def check(out, x, w, b, out_dtype, ctx):
        nonlocal failures, calls
        calls += 1
        try:
            _assert_one_rounding(out.cpu(), x.cpu(), w.cpu(), None if b is None else b.cpu(), out_dtype, ctx)
        except AssertionError as exc:
            failures += 1
            print("FAIL", exc)

    for hidden, experts in [(2880, 32), (7168, 256), (72, 17), (8, 3)]:
        for tokens in (1, 9, 70):
            for tiles in [None] + TILE_SHAPES:
                OPS._router_gemm_set_tiles(*(tiles or (-1, -1)))
                for dtype, out_dtype in [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]:
                    seed = _seed()
                    x, w, b = _inputs(tokens, hidden, experts, dtype, True, seed)
                    out = OPS.router_gemm(x, w, b, out_dtype)
                    check(out, x, w, b, out_dtype, f"T={tokens} H={hidden} E={experts} tiles={tiles} seed={seed}")
    OPS._router_gemm_set_tiles(-1, -1)

    variants = torch.randn(2, 16, 2880, device="cuda").to(torch.bfloat16)
    w = (torch.randn(128, 2880, device="cuda") * 0.1).to(torch.bfloat16)
    expected = torch.stack([OPS.router_gemm(v, w, None, None) for v in variants])
    x = torch.empty(16, 2880, dtype=torch.bfloat16, device="cuda")
    step = torch.zeros(1, dtype=torch.int32, device="cuda")
    counters = torch.zeros(2, dtype=torch.int64, device="cuda")
    for _ in range(4):
        OPS._test_pdl_producer(variants, step, x, 1000)
        OPS._test_pdl_consumer(OPS.router_gemm(x, w, None, None), expected, step, counters)
    torch.cuda.synchronize()
    if counters.tolist() != [0, 0]:
        failures += 1
        print("FAIL pdl chain: mismatches, NaNs =", counters.tolist())
    print(f"sanitizer workload: {calls} checked calls + PDL chain, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(sanitizer_workload())
