"""`fusion-passes bench routing`: the fusion_passes::topk_routing kernel against the composite
it replaces, softmax -> top-k -> renormalize in plain torch as Qwen3-MoE routes (with
norm_topk_prob), run eagerly and compiled by Inductor (mode default, fullgraph, dynamic=False).

Each variant is captured CALLS_PER_GRAPH times into one CUDA graph; a sample times
REPLAYS_PER_SAMPLE back-to-back replays with CUDA events, and the reported time per call is
the median over the samples divided by the calls they made. Logits are bf16 (by default), the
same buffer for every call, as a router's output would be: hot in L2.

The kernel is launched with programmatic dependent launch (PDL), so back to back each call's
launch overlaps the call before it, as it overlaps the router GEMM (also PDL) in a model.
`fused_after_plain_us` shows the other case: each call follows a 1-element add, a kernel
launched without PDL; it is the time of the add-and-route pair minus the launch floor (the
time of an add alone).

    python -m fusion_passes.bench.routing --out bench_out/routing
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fusion_passes.bench._timing import graph_time_per_call_us as time_per_call_us

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Targets of the issue: per-call time for small batches, and the ratio to Inductor at the top.
SMALL_BATCH_MAX_TOKENS = 128
SMALL_BATCH_MAX_EXPERTS = 256
SMALL_BATCH_TARGET_US = 2.0
SMALL_BATCH_MIN_SPEEDUP = 6.0
LARGE_BATCH_CASE = (256, 8, 8192)  # E, k, T
LARGE_BATCH_MAX_RATIO = 0.25


def composite_routing(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32 over the experts, top-k, then the chosen weights divided by their sum."""
    routing_weights = F.softmax(logits, dim=-1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, k, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights, selected_experts


def fused_routing(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fusion_passes.topk_routing(logits, k, "softmax", True, None)


def check_agreement(logits: torch.Tensor, k: int, compiled) -> None:
    """The three variants must agree on the weights (ids may differ on tied probabilities)."""
    fused_weights, _ = fused_routing(logits, k)
    for name, fn in (("eager", composite_routing), ("compiled", compiled)):
        weights, _ = fn(logits, k)
        torch.testing.assert_close(fused_weights, weights, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted({r["E"] for r in rows})
    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(len(ks), len(experts), figsize=(4.2 * len(experts), 3.4 * len(ks)), squeeze=False)
    for i, k in enumerate(ks):
        for j, num_experts in enumerate(experts):
            ax = axes[i][j]
            subset = sorted((r for r in rows if r["E"] == num_experts and r["k"] == k), key=lambda r: r["T"])
            tokens = [r["T"] for r in subset]
            for key, label, style in (
                ("fused_us", "fusion_passes kernel", "o-"),
                ("fused_after_plain_us", "kernel after a non-PDL kernel", "o:"),
                ("compiled_us", "torch.compile composite", "s--"),
                ("eager_us", "eager composite", "^:"),
            ):
                ax.plot(tokens, [r[key] for r in subset], style, label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"E={num_experts}, k={k}")
            ax.set_xlabel("tokens T")
            ax.set_ylabel("µs per call")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets_report(rows: list[dict]) -> list[str]:
    lines = []
    small = [r for r in rows if r["T"] <= SMALL_BATCH_MAX_TOKENS and r["E"] <= SMALL_BATCH_MAX_EXPERTS]
    if small:
        worst = max(small, key=lambda r: r["fused_us"])
        slowest_speedup = min(small, key=lambda r: r["speedup_vs_compiled"])
        ok = worst["fused_us"] <= SMALL_BATCH_TARGET_US and slowest_speedup["speedup_vs_compiled"] >= SMALL_BATCH_MIN_SPEEDUP
        lines.append(
            f"T<={SMALL_BATCH_MAX_TOKENS}, E<={SMALL_BATCH_MAX_EXPERTS}: slowest {worst['fused_us']:.2f} us "
            f"(E={worst['E']} k={worst['k']} T={worst['T']}), target <= {SMALL_BATCH_TARGET_US} us; "
            f"least speedup vs compiled {slowest_speedup['speedup_vs_compiled']:.1f}x, target >= "
            f"{SMALL_BATCH_MIN_SPEEDUP}x: {'MET' if ok else 'NOT MET'}"
        )
    num_experts, k, num_tokens = LARGE_BATCH_CASE
    large = [r for r in rows if (r["E"], r["k"], r["T"]) == LARGE_BATCH_CASE]
    if large:
        ratio = large[0]["fused_us"] / large[0]["compiled_us"]
        lines.append(
            f"T={num_tokens}, E={num_experts}, k={k}: {ratio:.3f}x the compiled composite, target <= "
            f"{LARGE_BATCH_MAX_RATIO}x: {'MET' if ratio <= LARGE_BATCH_MAX_RATIO else 'NOT MET'}"
        )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fusion-passes bench routing", description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--topk", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64, 128, 512, 2048, 8192])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--calls-per-graph", type=int, default=50)
    parser.add_argument("--replays-per-sample", type=int, default=5)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench_out/routing"))
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench routing: needs a CUDA GPU", file=sys.stderr)
        return 1
    from fusion_passes import kernels

    if not (kernels.load() and kernels.has_cuda_kernel("topk_routing")):
        print(f"bench routing: the CUDA kernel is not available: {kernels.load_error()}", file=sys.stderr)
        return 1

    dtype = DTYPES[args.dtype]
    timing = (args.calls_per_graph, args.replays_per_sample, args.samples)
    one_element = torch.zeros(1, device="cuda")
    launch_floor = time_per_call_us(lambda: one_element.add_(1), *timing)
    print(f"launch floor (a 1-element add per call, same graphs): {launch_floor:.2f} us")
    rows = []
    header = (
        f"{'E':>4} {'k':>2} {'T':>5} | {'fused us':>9} {'after plain':>11} {'compiled us':>11} {'eager us':>9} | "
        f"{'vs compiled':>11} {'vs eager':>8}"
    )
    print(header)
    print("-" * len(header))
    for num_experts in args.experts:
        for k in args.topk:
            for num_tokens in args.tokens:
                torch._dynamo.reset()  # one compiled graph per shape, no recompile limit
                compiled = torch.compile(composite_routing, mode="default", fullgraph=True, dynamic=False)
                logits = torch.randn(num_tokens, num_experts, device="cuda").to(dtype)
                check_agreement(logits, k, compiled)
                fused = time_per_call_us(lambda: fused_routing(logits, k), *timing)
                after_plain = time_per_call_us(lambda: (one_element.add_(1), fused_routing(logits, k)), *timing)
                after_plain -= launch_floor
                compiled_us = time_per_call_us(lambda: compiled(logits, k), *timing)
                eager = time_per_call_us(lambda: composite_routing(logits, k), *timing)
                row = {
                    "E": num_experts,
                    "k": k,
                    "T": num_tokens,
                    "fused_us": round(fused, 3),
                    "fused_after_plain_us": round(after_plain, 3),
                    "compiled_us": round(compiled_us, 3),
                    "eager_us": round(eager, 3),
                    "speedup_vs_compiled": round(compiled_us / fused, 2),
                    "speedup_vs_eager": round(eager / fused, 2),
                }
                rows.append(row)
                print(
                    f"{num_experts:>4} {k:>2} {num_tokens:>5} | {fused:>9.2f} {after_plain:>11.2f} {compiled_us:>11.2f} "
                    f"{eager:>9.2f} | "
                    f"{row['speedup_vs_compiled']:>10.1f}x {row['speedup_vs_eager']:>7.1f}x",
                    flush=True,
                )
                write_results(args.out, make_meta(argv, args, launch_floor), rows, [])  # partial results survive a kill

    summary = targets_report(rows)
    write_results(args.out, make_meta(argv, args, launch_floor), rows, summary)
    print()
    for line in summary:
        print(line)
    plot(rows, args.out / "routing.png", f"topk_routing, {args.dtype} logits, {torch.cuda.get_device_name()}, CUDA-graph replay")
    print(f"wrote {args.out}/routing.csv, routing.json, routing.png")
    return 0


def make_meta(argv: list[str], args: argparse.Namespace, launch_floor: float) -> dict:
    return {
        "command": "fusion-passes bench routing " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "calls_per_graph": args.calls_per_graph,
        "replays_per_sample": args.replays_per_sample,
        "samples": args.samples,
        "launch_floor_us": round(launch_floor, 3),
    }


def write_results(out: Path, meta: dict, rows: list[dict], targets: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "routing.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "routing.json").write_text(json.dumps({"meta": meta, "targets": targets, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
