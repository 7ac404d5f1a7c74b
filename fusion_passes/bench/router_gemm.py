"""``fusion-passes bench router-gemm``: the router GEMM op against cuBLAS (``F.linear``).

Per (H x E shape, T) it times, in CUDA-graph replay:

* ``ours``: ``fusion_passes::router_gemm`` as shipped (the kernel up to its shape-aware bound
  on T, cuBLAS above);
* ``kernel``: the op with the kernel forced at every T (max_tokens raised), to show the crossover;
* ``cublas``: ``torch.nn.functional.linear`` on the same inputs;
* with ``--sweep-tiles``, the kernel with each tile shape forced;
* with ``--l2-warm``, ``ours`` and ``cublas`` again with one weight and x for every call
  (no rotation, so they stay in L2: a separate, clearly labelled column).

With ``--routing``, a second table in the acceptance method of issue 15 (one weight, 4
rotating inputs, 50 calls per CUDA graph, median of 20 replays), every column of a row in
the same run: the router GEMM (as shipped, and the kernel variants: release of the
dependents after the last store instead of at the start, the tile rule filling 2 or 4 CTAs
an SM, weight loads before griddepcontrol.wait), cuBLAS, and the router + routing of the shape's model:
``fusion_passes::router_routing`` as shipped (``fused``: its fused kernel up to its token bound),
with its path forced (``fused_kernel``: the one kernel at every T the router GEMM kernel serves;
``two_kernels``: its two-kernel path), our two ops one after the other, and stock Inductor's
compiled F.linear + routing (softmax top-k for the gpt-oss/Qwen shapes, DeepSeek-V3's
grouped sigmoid top-8 for 7168x256). Writes ``router_routing.json``.

Each graph holds many back-to-back calls; the calls rotate over enough copies of the
weight and x that the whole rotation is at least twice the L2 cache, so each call reads
its weight from HBM as the router of a decode step does. The time per call is the median
graph replay time over the number of calls. The floor of a call is max(launch, bytes /
HBM bandwidth), bytes = weight + x + bias + output read or written once; the launch floor
is the measured time per call of a graph of tiny kernels.

Writes ``router_gemm.csv``, ``router_gemm.json`` and ``router_gemm.png`` (TFLOP/s vs T) to
``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

DEFAULT_SHAPES = "2880x32,2880x128,2048x128,7168x256"
DEFAULT_TOKENS = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192"
HBM_BYTES_PER_S = 3.0e12  # H100 SXM, device-to-device copy measured on the lent machine
TILE_SHAPES = [(1, 1), (1, 2), (2, 4), (2, 8)]
ALL_TOKENS_TO_KERNEL = 1 << 30
MAX_CALLS_PER_GRAPH = 1024
# The acceptance method: one weight, ROTATING_INPUTS inputs in turn, CALLS_PER_GRAPH calls a
# graph, the median of REPLAYS replays.
ROTATING_INPUTS, CALLS_PER_GRAPH, REPLAYS = 4, 50, 20
# (H, E) -> the model's routing: (k, scoring, renormalize, correction bias, n_group, topk_group, router bias)
MODEL_ROUTING = {
    (2880, 32): (4, "softmax", True, False, 1, 1, True),  # gpt-oss-20b
    (2880, 128): (4, "softmax", True, False, 1, 1, True),  # gpt-oss-120b
    (2048, 128): (8, "softmax", True, False, 1, 1, False),  # Qwen3-30B-A3B
    (7168, 256): (8, "sigmoid", True, True, 8, 4, False),  # DeepSeek-V3
}
MODEL_NAMES = {(2880, 32): "gpt-oss-20b", (2880, 128): "gpt-oss-120b", (2048, 128): "Qwen3-30B-A3B", (7168, 256): "DeepSeek-V3"}
# Router GEMM kernel variants: (release at start, ctas per SM, weight loads before wait).
GEMM_VARIANTS = {
    "ours": (True, 1, False),
    "release_after_store": (False, 1, False),
    "tiles_2_ctas_per_sm": (True, 2, False),
    "tiles_4_ctas_per_sm": (True, 4, False),
    "early_weight_loads": (True, 1, True),
}


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        h, e = item.lower().split("x")
        shapes.append((int(h), int(e)))
    return shapes


def _parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _time_graph_per_call(calls, reps: int) -> float:
    """Median microseconds per call of a CUDA graph that runs `calls` back to back."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def _launch_floor_us(reps: int) -> float:
    import torch

    t = torch.zeros(1, device="cuda")
    return _time_graph_per_call([lambda: t.add_(1.0)] * 256, reps)


def _copy_bandwidth(reps: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _time_graph_per_call([lambda: dst.copy_(src)] * 4, reps)
    return 2 * src.numel() / (us * 1e-6)


def _bench_point(hidden, experts, tokens, dtype, out_dtype, with_bias, rotate_bytes, min_calls, reps, sweep, l2_warm):
    import torch
    import torch.nn.functional as F

    ops = torch.ops.fusion_passes
    elem = torch.empty((), dtype=dtype).element_size()
    out_elem = torch.empty((), dtype=out_dtype or dtype).element_size()
    bytes_moved = (experts * hidden + tokens * hidden + (experts if with_bias else 0)) * elem
    bytes_moved += tokens * experts * out_elem
    copies = max(2, math.ceil(rotate_bytes / bytes_moved))
    calls_n = min(MAX_CALLS_PER_GRAPH, max(min_calls, copies))
    copies = min(copies, calls_n)
    gen = torch.Generator(device="cuda").manual_seed(tokens * 131 + hidden + experts)
    xs = [torch.randn(tokens, hidden, generator=gen, device="cuda").to(dtype) for _ in range(copies)]
    ws = [(torch.randn(experts, hidden, generator=gen, device="cuda") * 0.05).to(dtype) for _ in range(copies)]
    bs = [torch.randn(experts, generator=gen, device="cuda").to(dtype) if with_bias else None for _ in range(copies)]

    def op_calls(copies=copies):
        return [
            (lambda i=i: ops.router_gemm(xs[i % copies], ws[i % copies], bs[i % copies], out_dtype))
            for i in range(calls_n)
        ]

    def cublas_calls(copies=copies):
        if out_dtype is None or out_dtype == dtype:
            return [(lambda i=i: F.linear(xs[i % copies], ws[i % copies], bs[i % copies])) for i in range(calls_n)]
        return [
            (lambda i=i: F.linear(xs[i % copies], ws[i % copies], bs[i % copies]).to(out_dtype)) for i in range(calls_n)
        ]

    result = {
        "H": hidden,
        "E": experts,
        "T": tokens,
        "bytes": bytes_moved,
        "calls_per_graph": calls_n,
        "copies": copies,
    }
    result["path"] = "kernel" if tokens <= ops._router_gemm_kernel_max_tokens(hidden, experts) else "cublas"
    result["ours_us"] = _time_graph_per_call(op_calls(), reps)
    result["cublas_us"] = _time_graph_per_call(cublas_calls(), reps)
    if l2_warm:
        result["ours_l2warm_us"] = _time_graph_per_call(op_calls(copies=1), reps)
        result["cublas_l2warm_us"] = _time_graph_per_call(cublas_calls(copies=1), reps)
    ops._router_gemm_set_max_tokens(ALL_TOKENS_TO_KERNEL)
    try:
        result["kernel_us"] = _time_graph_per_call(op_calls(), reps)
        if sweep:
            for m_tiles, n_tiles in TILE_SHAPES:
                ops._router_gemm_set_tiles(m_tiles, n_tiles)
                result[f"tiles_{m_tiles}x{n_tiles}_us"] = _time_graph_per_call(op_calls(), reps)
    finally:
        ops._router_gemm_set_tiles(-1, -1)
        ops._router_gemm_set_max_tokens(-1)
    return result


def stock_router_routing(x, weight, bias, correction_bias, k, scoring, n_group, topk_group):
    """The router + routing as the Hugging Face models write it (what stock Inductor compiles)."""
    import torch
    import torch.nn.functional as F

    logits = F.linear(x, weight, bias)
    if scoring == "softmax":
        values, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
        return values / values.sum(dim=-1, keepdim=True), ids
    scores = logits.float().sigmoid()
    choice = scores + correction_bias
    tokens = choice.shape[0]
    group_scores = choice.view(tokens, n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
    kept = torch.zeros_like(group_scores).scatter_(1, torch.topk(group_scores, topk_group, dim=-1).indices, 1.0)
    mask = kept.unsqueeze(-1).expand(tokens, n_group, choice.shape[1] // n_group).reshape(tokens, -1)
    ids = torch.topk(choice.masked_fill(mask == 0, 0.0), k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids


def _routing_point(hidden, experts, tokens, dtype, stock) -> dict:
    """One row of the acceptance-method table (see the module docstring)."""
    import itertools

    import torch
    import torch.nn.functional as F

    from ._timing import graph_times_us

    ops = torch.ops.fusion_passes
    k, scoring, renormalize, with_correction, n_group, topk_group, with_bias = MODEL_ROUTING[(hidden, experts)]
    gen = torch.Generator(device="cuda").manual_seed(tokens * 131 + hidden + experts)
    xs = [torch.randn(tokens, hidden, generator=gen, device="cuda").to(dtype) for _ in range(ROTATING_INPUTS)]
    w = (torch.randn(experts, hidden, generator=gen, device="cuda") * 0.05).to(dtype)
    b = torch.randn(experts, generator=gen, device="cuda").to(dtype) if with_bias else None
    c = torch.randn(experts, generator=gen, device="cuda") * 0.1 if with_correction else None
    turn = itertools.count()

    def x():
        return xs[next(turn) % ROTATING_INPUTS]

    def gemm_settings(release_at_start, ctas_per_sm, early_loads):
        # Host-side settings, read when the kernel is launched (so when it is captured).
        ops._router_gemm_set_release_at_start(release_at_start)
        ops._router_gemm_set_ctas_per_sm(ctas_per_sm)
        ops._router_gemm_set_weight_loads_before_wait(early_loads)

    def gemm_variant(*variant):
        def call():
            gemm_settings(*variant)
            ops.router_gemm(x(), w, b, None)

        return call

    routing_args = (k, scoring, renormalize, c, n_group, topk_group, "top2_sum")

    def routing_path(path):
        def call():
            gemm_settings(*GEMM_VARIANTS["ours"])  # the router GEMM's as shipped
            ops._router_routing_set_path(path)
            ops.router_routing(x(), w, b, *routing_args, None)

        return call

    def two_ops():
        gemm_settings(*GEMM_VARIANTS["ours"])
        ops.topk_routing(ops.router_gemm(x(), w, b, None), *routing_args)

    fns = {name: gemm_variant(*variant) for name, variant in GEMM_VARIANTS.items()}
    fns["cublas"] = lambda: F.linear(x(), w, b)
    fns["fused"] = routing_path("auto")
    fns["fused_kernel"] = routing_path("fused")
    fns["two_kernels"] = routing_path("two_kernels")
    fns["two_ops"] = two_ops
    fns["inductor"] = lambda: stock(x(), w, b, c, k, scoring, n_group, topk_group)
    try:
        times = graph_times_us(fns, CALLS_PER_GRAPH, replays_per_sample=1, samples=REPLAYS)
    finally:
        for setting, default in zip(("release_at_start", "ctas_per_sm", "weight_loads_before_wait"), (True, 1, False)):
            getattr(ops, f"_router_gemm_set_{setting}")(default)
        ops._router_routing_set_path("auto")
    fused_bound = ops._router_routing_fused_max_tokens(hidden, experts)
    return {
        "H": hidden, "E": experts, "T": tokens, "k": k, "scoring": scoring, "n_group": n_group,
        "fused_max_tokens": fused_bound, **times,
    }  # fmt: skip


def _routing_table(shapes, tokens_list, dtype, out_dir: Path, meta: dict) -> None:
    import torch

    stock = torch.compile(stock_router_routing, dynamic=True)
    rows = []
    columns = [*GEMM_VARIANTS, "cublas", "fused", "fused_kernel", "two_kernels", "two_ops", "inductor"]
    print(f"# acceptance method: one weight, {ROTATING_INPUTS} rotating inputs, {CALLS_PER_GRAPH} calls a graph, "
          f"median of {REPLAYS} replays; us per call")  # fmt: skip
    print(f"{'H x E':>10} {'T':>5} " + " ".join(f"{c:>19}" for c in columns))
    for hidden, experts in shapes:
        if (hidden, experts) not in MODEL_ROUTING:
            continue
        for tokens in tokens_list:
            row = _routing_point(hidden, experts, tokens, dtype, stock)
            rows.append(row)
            print(f"{f'{hidden}x{experts}':>10} {tokens:>5} " + " ".join(f"{row[c]:>19.2f}" for c in columns), flush=True)
    with open(out_dir / "router_routing.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _tflops(rows, key: str) -> list[float]:
    return [2 * r["T"] * r["H"] * r["E"] / (r[key] * 1e-6) / 1e12 for r in rows]


def _plot(rows, shapes, path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2
    fig, axes = plt.subplots(
        math.ceil(len(shapes) / cols), cols, figsize=(12, 4.2 * math.ceil(len(shapes) / cols)), squeeze=False
    )
    for ax, (hidden, experts) in zip(axes.flat, shapes):
        pts = sorted((r for r in rows if r["H"] == hidden and r["E"] == experts), key=lambda r: r["T"])
        ts = [r["T"] for r in pts]

        ax.plot(ts, _tflops(pts, "ours_us"), "o-", label="fusion_passes::router_gemm")
        ax.plot(ts, _tflops(pts, "cublas_us"), "s--", label="cuBLAS (F.linear)")
        ax.plot(ts, _tflops(pts, "kernel_us"), ":", color="gray", label="kernel forced at every T")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        model = MODEL_NAMES.get((hidden, experts))
        ax.set_title(f"H={hidden}, E={experts}" + (f" ({model}'s router)" if model else ""))
        ax.set_xlabel("tokens T")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"MoE router GEMM [T, H] x [E, H]^T, {meta['dtype']}, on {meta['gpu']} (torch {meta['torch']})\nCUDA-graph replay of "
        f"back-to-back calls, weights rotated over {meta['rotate_bytes'] / 1e6:.0f} MB (read from HBM); higher is faster"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fusion-passes bench router-gemm", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated HxE (default: %(default)s)")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated T values (default: %(default)s)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--out-dtype", choices=["input", "fp32"], default="input")
    parser.add_argument("--bias", action="store_true", help="add a bias [E]")
    parser.add_argument("--min-calls", type=int, default=32, help="fewest calls captured in one graph")
    parser.add_argument("--reps", type=int, default=15, help="graph replays timed (the median is kept)")
    parser.add_argument(
        "--rotate-mb",
        type=float,
        default=0.0,
        help="MB the rotated weight+x copies must span (default: twice the L2 cache)",
    )
    parser.add_argument("--sweep-tiles", action="store_true", help="also time every kernel tile shape")
    parser.add_argument("--l2-warm", action="store_true", help="also time ours and cuBLAS with L2-resident operands")
    parser.add_argument(
        "--weight-loads-before-wait",
        action="store_true",
        help="opt in to the kernel's early weight loads (correct only for weights no running kernel writes)",
    )
    parser.add_argument(
        "--routing",
        action="store_true",
        help="also the acceptance-method table: kernel variants, cuBLAS, router_routing, our two ops, stock Inductor",
    )
    parser.add_argument("--out", default="router_gemm_bench", help="directory for CSV, JSON and PNG")
    args = parser.parse_args(argv)

    import torch

    import fusion_passes  # noqa: F401
    from fusion_passes import kernels

    if not torch.cuda.is_available():
        print("router-gemm bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    if not kernels.load():
        print(f"router-gemm bench: kernels not loaded: {kernels.load_error()}", file=sys.stderr)
        return 2
    torch.ops.fusion_passes._router_gemm_set_weight_loads_before_wait(args.weight_loads_before_wait)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out_dtype = None if args.out_dtype == "input" else torch.float32
    shapes = _parse_shapes(args.shapes)
    tokens_list = _parse_ints(args.tokens)
    props = torch.cuda.get_device_properties(0)
    rotate_bytes = args.rotate_mb * 1e6 if args.rotate_mb > 0 else 2 * props.L2_cache_size
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    launch_us = _launch_floor_us(args.reps)
    copy_bw = _copy_bandwidth(args.reps)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": "fusion-passes bench router-gemm " + " ".join(argv),
        "dtype": args.dtype,
        "out_dtype": args.out_dtype,
        "bias": args.bias,
        "max_tokens": torch.ops.fusion_passes._router_gemm_max_tokens(),
        "rotate_bytes": rotate_bytes,
        "launch_floor_us": launch_us,
        "copy_bandwidth_Bps": copy_bw,
        "hbm_Bps_for_floor": HBM_BYTES_PER_S,
    }
    print(f"# {meta['gpu']}, torch {meta['torch']} (CUDA {meta['cuda']}), {meta['date']}")
    print(
        f"# launch floor {launch_us:.2f} us/call (graph of tiny kernels); copy {copy_bw / 1e12:.2f} TB/s; "
        f"kernel max_tokens {meta['max_tokens']} (-1: shape-aware); rotation {rotate_bytes / 1e6:.0f} MB"
    )

    rows = []
    header = (
        f"{'H x E':>10} {'T':>5} {'path':>6} {'ours us':>8} {'cuBLAS us':>9} {'speedup':>7} "
        f"{'kernel us':>9} {'floor us':>8} {'x floor':>7} {'TFLOP/s':>7}"
    )
    print(header)
    for hidden, experts in shapes:
        for tokens in tokens_list:
            r = _bench_point(
                hidden,
                experts,
                tokens,
                dtype,
                out_dtype,
                args.bias,
                rotate_bytes,
                args.min_calls,
                args.reps,
                args.sweep_tiles,
                args.l2_warm,
            )
            r["mem_floor_us"] = r["bytes"] / HBM_BYTES_PER_S * 1e6
            r["floor_us"] = max(launch_us, r["mem_floor_us"])
            r["speedup"] = r["cublas_us"] / r["ours_us"]
            r["ours_tflops"] = 2 * tokens * hidden * experts / (r["ours_us"] * 1e-6) / 1e12
            r["cublas_tflops"] = 2 * tokens * hidden * experts / (r["cublas_us"] * 1e-6) / 1e12
            rows.append(r)
            line = (
                f"{f'{hidden}x{experts}':>10} {tokens:>5} {r['path']:>6} {r['ours_us']:>8.2f} "
                f"{r['cublas_us']:>9.2f} {r['speedup']:>6.2f}x {r['kernel_us']:>9.2f} {r['floor_us']:>8.2f} "
                f"{r['ours_us'] / r['floor_us']:>6.2f}x {r['ours_tflops']:>7.2f}"
            )
            if args.l2_warm:
                line += f"  L2-warm: ours {r['ours_l2warm_us']:.2f} cuBLAS {r['cublas_l2warm_us']:.2f}"
            if args.sweep_tiles:
                best = min(TILE_SHAPES, key=lambda s: r[f"tiles_{s[0]}x{s[1]}_us"])
                line += "  tiles " + " ".join(f"{m}x{n}:{r[f'tiles_{m}x{n}_us']:.2f}" for m, n in TILE_SHAPES)
                line += f"  best {best[0]}x{best[1]}"
            print(line, flush=True)

    # Largest T of the list up to which the kernel beats cuBLAS on every shape.
    crossover = 0
    for tokens in sorted(tokens_list):
        if all(r["kernel_us"] <= r["cublas_us"] for r in rows if r["T"] == tokens):
            crossover = tokens
        else:
            break
    meta["kernel_faster_up_to_T"] = crossover
    print(f"# kernel faster than cuBLAS on every shape up to T={crossover}")

    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("H", "E", "T", "path"), k))
    with open(out_dir / "router_gemm.csv", "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(str(r.get(k, "")) for k in keys) + "\n")
    with open(out_dir / "router_gemm.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    _plot(rows, shapes, out_dir / "router_gemm.png", meta)
    if args.routing:
        _routing_table(shapes, tokens_list, dtype, out_dir, meta)
    print(f"# wrote {out_dir}/router_gemm.csv, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
