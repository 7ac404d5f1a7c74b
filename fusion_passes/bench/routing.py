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

A second table (routing_deepseek.*) times DeepSeek-V3's routing on fp32 logits (the HF model
computes its router in fp32): sigmoid + correction bias, group-limited (E=256, 8 groups, 4
kept, top-8) and the same with one group (GLM-4.5 / Kimi-K2 configs), each against the HF
DeepseekV3 form compiled by Inductor and run eagerly. The op's side includes the multiply by
routed_scaling_factor that the pass leaves after it.

    python -m fusion_passes.bench.routing --out bench_out/routing
    python -m fusion_passes.bench.routing --replot routing.json --out DIR   # redraw routing.png, no GPU
    (a routing_deepseek.json redraws routing_deepseek.png)
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
from fusion_passes.bench._timing import graph_times_us

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Targets of the issue: per-call time for small batches, and the ratio to Inductor at the top.
SMALL_BATCH_MAX_TOKENS = 128
SMALL_BATCH_MAX_EXPERTS = 256
SMALL_BATCH_TARGET_US = 2.0
SMALL_BATCH_MIN_SPEEDUP = 6.0
LARGE_BATCH_CASE = (256, 8, 8192)  # E, k, T
LARGE_BATCH_MAX_RATIO = 0.25
# DeepSeek-V3 routing: E, k, n_group, topk_group, routed_scaling_factor; and its targets.
DEEPSEEK_CASES = {
    "deepseek-v3 grouped": (256, 8, 8, 4, 2.5),
    "E=256 sigmoid+bias, one group": (256, 8, 1, 1, 2.5),
}
DEEPSEEK_TARGET_CASE = "deepseek-v3 grouped"
DEEPSEEK_TARGET_US = 2.5
DEEPSEEK_MIN_SPEEDUP = 8.0


def composite_routing(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32 over the experts, top-k, then the chosen weights divided by their sum."""
    routing_weights = F.softmax(logits, dim=-1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, k, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights, selected_experts


def fused_routing(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fusion_passes.topk_routing(logits, k, "softmax", True, None)


def deepseek_v3_composite(logits, bias, k, n_group, topk_group, scale):
    """DeepSeek-V3's routing as the transformers model writes it: sigmoid scores, the bias
    added for the choice, groups scored by their two best, topk_group groups kept through a
    scattered mask, an unsorted top-k of the masked scores, the sigmoid scores gathered,
    divided by their sum + 1e-20, times routed_scaling_factor."""
    num_experts = logits.shape[-1]
    scores = logits.sigmoid()
    scores_for_choice = scores + bias.unsqueeze(0)
    group_scores = scores_for_choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
    topk_indices = torch.topk(scores_for_choice, k=k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    topk_weights /= topk_weights.sum(dim=-1, keepdim=True) + 1e-20
    return topk_weights * scale, topk_indices


def deepseek_v3_op(logits, bias, k, n_group, topk_group):
    """The routing itself: what nan_safe_routing puts in place of the HF form up to the scaling."""
    return torch.ops.fusion_passes.topk_routing(logits, k, "sigmoid", True, bias, n_group, topk_group)


def deepseek_v3_fused(logits, bias, k, n_group, topk_group, scale):
    """The op, then routed_scaling_factor as an eager multiply (a second kernel; in a compiled
    model Inductor emits it, fused with whatever else it can)."""
    weights, ids = deepseek_v3_op(logits, bias, k, n_group, topk_group)
    return weights * scale, ids


def check_deepseek_agreement(logits, bias, route, compiled) -> None:
    """Same experts and weights (the composite's order is unsorted: compare by expert id).
    route: (k, n_group, topk_group, routed_scaling_factor)."""
    fused_weights, fused_ids = deepseek_v3_fused(logits, bias, *route)
    order = fused_ids.argsort(dim=-1)
    for name, fn in (("eager", deepseek_v3_composite), ("compiled", compiled)):
        weights, ids = fn(logits, bias, *route)
        by_id = ids.argsort(dim=-1)
        assert torch.equal(ids.gather(1, by_id), fused_ids.gather(1, order)), f"{name}: other experts"
        torch.testing.assert_close(
            weights.gather(1, by_id), fused_weights.gather(1, order), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )


def check_agreement(logits: torch.Tensor, k: int, compiled) -> None:
    """The three variants must agree on the weights (ids may differ on tied probabilities)."""
    fused_weights, _ = fused_routing(logits, k)
    for name, fn in (("eager", composite_routing), ("compiled", compiled)):
        weights, _ = fn(logits, k)
        torch.testing.assert_close(fused_weights, weights, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def readable_log_axes(ax, tokens: list[int]) -> None:
    """Log-log axes labelled with plain numbers: T at the measured counts, µs at 1-2-5 steps."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(tokens))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)


def plot_panels(panels: list[list[tuple[str, list[dict]]]], series, path: Path, title: str, panel_size, ylabel) -> None:
    """A grid of log-log panels of µs per call against T: panels[i][j] = (panel title, rows),
    one line per (row key, legend label, line style) of series, the first (the op) thick and
    on top; the legend under the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = panel_size
    columns = len(panels[0])
    fig, axes = plt.subplots(len(panels), columns, figsize=(width * columns, height * len(panels)), squeeze=False)
    for panel_axes, panel_row in zip(axes, panels):
        for ax, (panel_title, rows) in zip(panel_axes, panel_row):
            subset = sorted(rows, key=lambda r: r["T"])
            tokens = [r["T"] for r in subset]
            for index, (key, label, style) in enumerate(series):
                headline = index == 0
                ax.plot(tokens, [r[key] for r in subset], style, label=label,
                        linewidth=2.5 if headline else 1.2, zorder=3 if headline else 2)
            readable_log_axes(ax, tokens)
            ax.set_title(panel_title)
            ax.set_xlabel("tokens T")
            ax.set_ylabel(ylabel)
    fig.suptitle(title)
    columns_of_legend = 2
    legend_inches = 0.1 + 0.25 * -(-len(series) // columns_of_legend)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=columns_of_legend, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[dict], path: Path, title: str) -> None:
    experts = sorted({r["E"] for r in rows})
    ks = sorted({r["k"] for r in rows})
    panels = [
        [(f"E={e}, k={k}", [r for r in rows if r["E"] == e and r["k"] == k]) for e in experts] for k in ks
    ]
    series = (
        ("fused_us", "fusion_passes::topk_routing, calls back to back with PDL (as after the router GEMM)", "o-"),
        ("fused_after_plain_us", "fusion_passes::topk_routing, each call after a kernel without PDL", "o:"),
        ("compiled_us", "softmax → top-k → renormalize, torch.compile (Inductor)", "s--"),
        ("eager_us", "softmax → top-k → renormalize, eager PyTorch", "^:"),
    )
    plot_panels(panels, series, path, title, (4.2, 3.4), "µs per call (lower is better)")


def plot_title(meta: dict) -> str:
    """What routing.png shows, in words: the op, the logits, the GPU, torch, the method."""
    return (
        f"fusion_passes::topk_routing against the softmax → top-k → renormalize it replaces, {meta['dtype']} logits\n"
        + method_line(meta)
    )


def method_line(meta: dict) -> str:
    """The GPU, torch and timing method of a run, for a plot's title."""
    return f"{meta['gpu']}, torch {meta['torch']}: median of CUDA-graph replays, {meta['calls_per_graph']} calls a graph"


def deepseek_plot_title(meta: dict) -> str:
    return "DeepSeek-V3 routing (sigmoid + bias, fp32 logits)\n" + method_line(meta)


def plot_deepseek(rows: list[dict], path: Path, title: str) -> None:
    cases = list(dict.fromkeys(r["case"] for r in rows))
    panels = [[(case, [r for r in rows if r["case"] == case]) for case in cases]]
    series = (
        ("fused_us", "fusion_passes::topk_routing", "o-"),
        ("fused_scaled_us", "fusion_passes::topk_routing, then x scale (eager)", "d-."),
        ("compiled_us", "HF DeepseekV3 routing, torch.compile (Inductor)", "s--"),
        ("eager_us", "HF DeepseekV3 routing, eager PyTorch", "^:"),
    )
    plot_panels(panels, series, path, title, (5.2, 4.0), "µs per call (lower is better)")


def deepseek_targets_report(rows: list[dict]) -> list[str]:
    small = [r for r in rows if r["case"] == DEEPSEEK_TARGET_CASE and r["T"] <= SMALL_BATCH_MAX_TOKENS]
    if not small:
        return []
    worst = max(small, key=lambda r: r["fused_us"])
    slowest_speedup = min(small, key=lambda r: r["speedup_vs_compiled"])
    ok = worst["fused_us"] <= DEEPSEEK_TARGET_US and slowest_speedup["speedup_vs_compiled"] >= DEEPSEEK_MIN_SPEEDUP
    return [
        f"{DEEPSEEK_TARGET_CASE}, T<={SMALL_BATCH_MAX_TOKENS}: slowest {worst['fused_us']:.2f} us (T={worst['T']}), "
        f"target <= {DEEPSEEK_TARGET_US} us; least speedup vs compiled {slowest_speedup['speedup_vs_compiled']:.1f}x "
        f"(T={slowest_speedup['T']}), target >= {DEEPSEEK_MIN_SPEEDUP}x: {'MET' if ok else 'NOT MET'}"
    ]


# The op alone per form, E = 256, k = 8, renormalized: (logit dtype, scoring, correction
# bias?, n_group, topk_group). Says what a bias or groups cost on top of the plain form.
FORMS = {
    "bf16 softmax": (torch.bfloat16, "softmax", False, 1, 1),
    "fp32 softmax": (torch.float32, "softmax", False, 1, 1),
    "fp32 sigmoid": (torch.float32, "sigmoid", False, 1, 1),
    "fp32 sigmoid + bias": (torch.float32, "sigmoid", True, 1, 1),
    "fp32 sigmoid, groups 8/4": (torch.float32, "sigmoid", False, 8, 4),
    "fp32 sigmoid + bias, groups 8/4": (torch.float32, "sigmoid", True, 8, 4),
    "bf16 sigmoid + bias, groups 8/4": (torch.bfloat16, "sigmoid", True, 8, 4),
}


def run_forms(tokens: list[int], timing: tuple[int, int, int]) -> list[dict]:
    """µs per call of the op alone for each of FORMS, the forms of one T side by side."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    bias = torch.randn(256, device="cuda", generator=gen) * 0.05
    rows = []
    print(f"{'T':>5} " + " ".join(f"{name:>31}" for name in FORMS))
    for num_tokens in tokens:
        fns = {}
        for name, (dtype, scoring, with_bias, n_group, topk_group) in FORMS.items():
            logits = torch.randn(num_tokens, 256, device="cuda", generator=gen).to(dtype)
            args = (logits, 8, scoring, True, bias if with_bias else None, n_group, topk_group)
            fns[name] = lambda args=args: torch.ops.fusion_passes.topk_routing(*args)
        times = graph_times_us(fns, *timing)
        rows.append({"T": num_tokens, **{name: round(us, 3) for name, us in times.items()}})
        print(f"{num_tokens:>5} " + " ".join(f"{times[name]:>31.2f}" for name in FORMS), flush=True)
    return rows


def run_deepseek(args: argparse.Namespace, timing: tuple[int, int, int]) -> tuple[list[dict], list[str]]:
    header = (f"{'case':>30} {'T':>5} | {'op us':>7} {'op+scale':>8} {'compiled us':>11} {'eager us':>9} |"
              f" {'vs compiled':>11}")
    print(header)
    print("-" * len(header))
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (num_experts, *route) in DEEPSEEK_CASES.items():
        bias = torch.randn(num_experts, device="cuda", generator=gen) * 0.05
        for num_tokens in args.deepseek_tokens:
            torch._dynamo.reset()
            compiled = torch.compile(deepseek_v3_composite, mode="default", fullgraph=True, dynamic=False)
            logits = torch.randn(num_tokens, num_experts, device="cuda", generator=gen)
            check_deepseek_agreement(logits, bias, route, compiled)
            fused = time_per_call_us(lambda: deepseek_v3_op(logits, bias, *route[:3]), *timing)
            fused_scaled = time_per_call_us(lambda: deepseek_v3_fused(logits, bias, *route), *timing)
            compiled_us = time_per_call_us(lambda: compiled(logits, bias, *route), *timing)
            eager = time_per_call_us(lambda: deepseek_v3_composite(logits, bias, *route), *timing)
            row = {
                "case": name,
                "T": num_tokens,
                "fused_us": round(fused, 3),
                "fused_scaled_us": round(fused_scaled, 3),
                "compiled_us": round(compiled_us, 3),
                "eager_us": round(eager, 3),
                "speedup_vs_compiled": round(compiled_us / fused, 2),
            }
            rows.append(row)
            print(f"{name:>30} {num_tokens:>5} | {fused:>7.2f} {fused_scaled:>8.2f} {compiled_us:>11.2f} {eager:>9.2f} | "
                  f"{row['speedup_vs_compiled']:>10.1f}x", flush=True)
    return rows, deepseek_targets_report(rows)


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
    parser.add_argument("--deepseek-tokens", type=int, nargs="*", default=[1, 8, 32, 64, 128, 512, 2048],
                        help="token counts of the DeepSeek-V3 table (none: skip it)")
    parser.add_argument("--forms-tokens", type=int, nargs="*", default=[1, 32, 128],
                        help="token counts of the table of the op alone per form (none: skip it)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--calls-per-graph", type=int, default=50)
    parser.add_argument("--replays-per-sample", type=int, default=5)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench_out/routing"))
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only redraw the plot into --out from an earlier run's routing.json "
                             "(routing.png) or routing_deepseek.json (routing_deepseek.png)")
    args = parser.parse_args(argv)
    if args.replot:
        results = json.loads(args.replot.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        if "case" in results["rows"][0]:
            path = args.out / "routing_deepseek.png"
            plot_deepseek(results["rows"], path, deepseek_plot_title(results["meta"]))
        else:
            path = args.out / "routing.png"
            plot(results["rows"], path, plot_title(results["meta"]))
        print(f"wrote {path}")
        return 0

    if not torch.cuda.is_available():
        print("bench routing: needs a CUDA GPU", file=sys.stderr)
        return 2
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
    meta = make_meta(argv, args, launch_floor)
    write_results(args.out, meta, rows, summary)
    plot(rows, args.out / "routing.png", plot_title(meta))
    print(f"wrote {args.out}/routing.csv, routing.json, routing.png")
    if args.deepseek_tokens:
        print()
        deepseek_rows, deepseek_summary = run_deepseek(args, timing)
        summary += deepseek_summary
        deepseek_meta = make_meta(argv, args, launch_floor)
        write_results(args.out, deepseek_meta, deepseek_rows, deepseek_summary, "routing_deepseek")
        plot_deepseek(deepseek_rows, args.out / "routing_deepseek.png", deepseek_plot_title(deepseek_meta))
        print(f"wrote {args.out}/routing_deepseek.csv, routing_deepseek.json, routing_deepseek.png")
    if args.forms_tokens:
        print()
        forms_rows = run_forms(args.forms_tokens, timing)
        write_results(args.out, make_meta(argv, args, launch_floor), forms_rows, [], "routing_forms")
        print(f"wrote {args.out}/routing_forms.csv, routing_forms.json")
    print()
    for line in summary:
        print(line)
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


def write_results(out: Path, meta: dict, rows: list[dict], targets: list[str], stem: str = "routing") -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "targets": targets, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
