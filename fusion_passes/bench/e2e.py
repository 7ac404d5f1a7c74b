"""End-to-end decode steps: stock Inductor against Inductor + fusion_passes, same run.

    fusion-passes bench e2e [--tokens 1,8,32,128] [--layers 4] [--out DIR]

Models (bf16, real expert weights, experts as grouped GEMMs over tokens sorted by
expert, torch._grouped_mm where the installed torch has it):
  gpt-oss-e32    H=2880, E=32,  top-4, expert intermediate 2880 (gpt-oss-20b's layer)
  gpt-oss-e128   H=2880, E=128, top-4
  qwen3-moe      H=2048, E=128, top-8, expert intermediate 768 (Qwen3-30B-A3B's layer)
  deepseek-v3    H=7168, E=256 in 8 groups (best 4 kept), top-8 sigmoid + bias, intermediate 2048
                 (DeepSeek-V3's MoE layer; not in the default --models: 22.5 GB a layer)
  gpt-oss-20b-layer  one full-size gpt-oss-20b-shaped layer (--full-layer)

Each step (T tokens of one decode step, no KV cache: attention over the T tokens) is
compiled once per backend (static at the first T, dynamic from the second), captured in a
CUDA graph per T and replayed; the number is the median replay time, the two backends'
replays alternating. The router + routing part of a layer (the MoE block's router linear and routing,
compiled and captured alone: what the passes replace) is timed three ways: 20 calls a graph
(µs per call of the chain); from the profiler, the summed duration of its kernels per call
and how many there are; and inside the whole step's profile, per layer
(``in_step_router_routing_us``).

``--inductor-pdl`` compiles both backends with Inductor's programmatic dependent launch on
(``torch._inductor.config.triton.enable_pdl``, the ``TORCHINDUCTOR_ENABLE_PDL=1`` setting),
so Inductor's Triton kernels may overlap their neighbours, ours included (issue 15 part 3:
measure it before it becomes a PassConfig field).

``--device cpu`` runs the same code eagerly-timed on tiny shapes: a smoke test of
this script, not a benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._inductor import config as inductor_config

import fusion_passes
from fusion_passes.bench._timing import graph_times_us, profiled_kernels_per_call
from fusion_passes.models import MODELS, ModelConfig, build_model


def _at_size(built_in: str, name: str, hidden: int, heads: int, kv_heads: int, head_dim: int, **moe) -> ModelConfig:
    """The built-in model's structure (norm, router, routing arithmetic, padding) at a real
    model's sizes, with grouped-GEMM experts; ``moe`` replaces fields of its MoEConfig."""
    cfg = MODELS[built_in]
    return dataclasses.replace(
        cfg,
        name=name,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=1024,
        moe=dataclasses.replace(cfg.moe, expert_compute="grouped", **moe),
    )


def _gpt_oss(name: str, experts: int) -> ModelConfig:
    """gpt-oss-20b's layer shape (H = 2880, 64 heads of 64, expert intermediate 2880, top-4)
    with ``experts`` experts."""
    return _at_size("gpt-oss", name, 2880, 64, 8, 64, num_experts=experts, intermediate_size=2880)


BENCH_MODELS = {
    "gpt-oss-e32": _gpt_oss("bench-gpt-oss-e32", 32),
    "gpt-oss-e128": _gpt_oss("bench-gpt-oss-e128", 128),
    # Qwen3-30B-A3B's layer: H = 2048, 32 heads of 128, 128 experts of intermediate 768, top-8.
    "qwen3-moe": _at_size(
        "qwen3-moe", "bench-qwen3-moe", 2048, 32, 4, 128, num_experts=128, top_k=8, intermediate_size=768
    ),
    # DeepSeek-V3's MoE layer: H = 7168, 256 experts of intermediate 2048 in 8 groups, the best 4
    # groups kept, top-8 by sigmoid + correction bias, one shared expert; attention is plain
    # (56 heads of 128), not MLA. 22.5 GB of expert weights a layer: --layers 1 or 2 on one GPU.
    "deepseek-v3": _at_size(
        "deepseek-v3",
        "bench-deepseek-v3",
        7168,
        56,
        8,
        128,
        num_experts=256,
        top_k=8,
        intermediate_size=2048,
        shared_expert_intermediate_size=2048,
    ),
}
SMOKE_MODELS = {  # the same structure at sizes a CPU compiles in seconds
    name: dataclasses.replace(
        cfg,
        name=cfg.name.replace("bench-", "smoke-"),
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        moe=dataclasses.replace(cfg.moe, intermediate_size=32),
    )
    for name, cfg in BENCH_MODELS.items()
}


def register(cfg: ModelConfig) -> str:
    """build_model takes registered names; bench shapes register under their own."""
    MODELS.setdefault(cfg.name, cfg)
    return cfg.name


ROUTER_CALLS_PER_GRAPH = 20


def _timed(fns: dict, device: str, replays: int, calls_per_graph: int = 1) -> dict[str, float]:
    """Median seconds per call of each function: CUDA-graph replay on a GPU, the functions'
    samples alternating; plain calls on a CPU."""
    if device == "cpu":
        seconds = {}
        for name, fn in fns.items():
            samples = []
            for _ in range(replays):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            seconds[name] = statistics.median(samples)
        return seconds
    times = graph_times_us(fns, calls_per_graph, replays_per_sample=1, samples=replays)
    return {name: us / 1e6 for name, us in times.items()}


class RouterAndRouting(torch.nn.Module):
    """A layer's router linear and routing, as the model computes them."""

    def __init__(self, moe_block):
        super().__init__()
        self.moe = moe_block

    def forward(self, x):
        return self.moe.route(self.moe.router(x), x.dtype)


def _compile(module, backend_name: str):
    backend = "inductor" if backend_name == "inductor" else fusion_passes.Backend()
    # Dynamo's automatic dynamic shapes: the first T compiles static, the second once more
    # with T dynamic, and every later T reuses that.
    return torch.compile(module, backend=backend), backend


def measure(cfg: ModelConfig, layers: int, tokens: list[int], device: str, replays: int) -> list[dict]:
    name = register(cfg)
    dtype = torch.bfloat16
    model = build_model(name, layers, dtype=dtype, device=device)
    router = RouterAndRouting(model.layers[0].mlp)
    torch._dynamo.reset()
    compiled = {b: (_compile(model, b), _compile(router, b)[0]) for b in ("inductor", "fusion_passes")}
    rows = []
    for num_tokens in tokens:
        generator = torch.Generator(device).manual_seed(num_tokens)
        ids = torch.randint(0, cfg.vocab_size, (num_tokens,), device=device, generator=generator)
        hidden = torch.randn(num_tokens, cfg.hidden_size, dtype=dtype, device=device, generator=generator)
        row = {"model": cfg.name, "layers": layers, "T": num_tokens}
        with torch.no_grad():
            outputs = {b: step(ids) for b, ((step, _), _) in compiled.items()}
            row["counts"] = dict(compiled["fusion_passes"][0][1].report.counts)  # summed over the compiles so far
            steps = {b: (lambda step=step: step(ids)) for b, ((step, _), _) in compiled.items()}
            routings = {b: (lambda routing=routing: routing(hidden)) for b, (_, routing) in compiled.items()}
            for b, seconds in _timed(steps, device, replays).items():
                row[f"{b}_step_us"] = 1e6 * seconds
            # Many calls a graph: a lone call of a few µs would mostly time the graph's launch.
            for b, seconds in _timed(routings, device, replays, ROUTER_CALLS_PER_GRAPH).items():
                row[f"{b}_router_routing_us"] = 1e6 * seconds
            if device == "cuda":  # the profiler's view: the kernels' own time, no launch gaps
                for b in compiled:
                    profiled = profiled_kernels_per_call(routings[b], ROUTER_CALLS_PER_GRAPH)
                    row[f"{b}_router_routing_kernel_us"] = profiled["us"]
                    row[f"{b}_router_routing_kernels"] = profiled["kernels"]
                    row[f"{b}_router_routing_by_kernel_us"] = profiled["by_kernel_us"]
                    row[f"{b}_step_by_kernel_us"] = profiled_kernels_per_call(steps[b], 1)["by_kernel_us"]
                    row[f"{b}_router_routing_in_step_us"] = in_step_router_routing_us(row, b)
        a, b = outputs["inductor"].float(), outputs["fusion_passes"].float()
        row["relative_difference"] = ((a - b).norm() / a.norm()).item()
        row["step_speedup"] = row["inductor_step_us"] / row["fusion_passes_step_us"]
        row["router_routing_speedup"] = row["inductor_router_routing_us"] / row["fusion_passes_router_routing_us"]
        profiler_note = ""
        if "inductor_router_routing_kernel_us" in row:
            row["router_routing_kernel_speedup"] = (
                row["inductor_router_routing_kernel_us"] / row["fusion_passes_router_routing_kernel_us"]
            )
            profiler_note = (
                f"   profiler: {row['inductor_router_routing_kernel_us']:.1f} us in"
                f" {row['inductor_router_routing_kernels']:.0f} kernels -> {row['fusion_passes_router_routing_kernel_us']:.1f}"
                f" us in {row['fusion_passes_router_routing_kernels']:.0f} ({row['router_routing_kernel_speedup']:.2f}x)"
            )
        rows.append(row)
        print(
            f"{cfg.name:>22} T={num_tokens:<4} step {row['inductor_step_us']:9.1f} -> {row['fusion_passes_step_us']:9.1f} us"
            f" ({row['step_speedup']:.2f}x)   router+routing {row['inductor_router_routing_us']:7.1f} ->"
            f" {row['fusion_passes_router_routing_us']:7.1f} us ({row['router_routing_speedup']:.2f}x){profiler_note}"
            f"   rel diff {row['relative_difference']:.1e}",
            flush=True,
        )
    return rows


def in_step_router_routing_us(row: dict, backend: str) -> float:
    """Router + routing time per layer inside the whole step, from the step's profile: the
    kernels whose names the standalone router + routing compile also ran. Exact where those
    names are the router's and routing's own (our two kernels); an upper bound where the step
    runs a kernel of the same name elsewhere (a cuBLAS GEMM or sort shared with the experts),
    and short of a kernel that Inductor fused into a neighbour in the step."""
    names = row[f"{backend}_router_routing_by_kernel_us"]
    step = row[f"{backend}_step_by_kernel_us"]
    return sum(us for name, us in step.items() if name in names) / row["layers"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fusion-passes bench e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt-oss-e32,gpt-oss-e128,qwen3-moe")
    parser.add_argument("--tokens", default="1,8,32,128")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--full-layer", action="store_true", help="also one full-size gpt-oss-20b-shaped layer")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of this script on tiny shapes"
    )
    parser.add_argument("--out", default=None, help="write results.json and e2e.png here")
    parser.add_argument(
        "--replot", default=None, metavar="JSON", help="only redraw e2e.png (in --out) from a recorded results.json"
    )
    parser.add_argument(
        "--inductor-pdl",
        action="store_true",
        help="compile both backends with torch._inductor.config.triton.enable_pdl on (TORCHINDUCTOR_ENABLE_PDL=1)",
    )
    args = parser.parse_args(argv)
    if args.replot:
        out = Path(args.out) if args.out else Path(args.replot).parent
        out.mkdir(parents=True, exist_ok=True)
        plot(json.loads(Path(args.replot).read_text()), out / "e2e.png")
        print(f"wrote {out / 'e2e.png'}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench e2e: needs a CUDA GPU (--device cpu: a smoke test of the script, not a measurement)", file=sys.stderr)
        return 2

    configs = SMOKE_MODELS if args.device == "cpu" else BENCH_MODELS
    unknown = set(args.models.split(",")) - set(configs)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {sorted(configs)}")
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.inductor_pdl:
        inductor_config.triton.enable_pdl = True
    rows = []
    for model_name in args.models.split(","):
        rows += measure(configs[model_name], args.layers, tokens, args.device, args.replays)
    if args.full_layer and args.device != "cpu":
        rows += measure(_gpt_oss("bench-gpt-oss-20b-layer", 32), 1, tokens, args.device, args.replays)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        meta = {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "replays": args.replays,
            "inductor_pdl": bool(inductor_config.triton.enable_pdl),
        }
        results = {"meta": meta, "rows": rows}
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
        try:
            plot(results, Path(args.out) / "e2e.png")
        except ImportError:
            print("matplotlib is not installed (pip install 'fusion-passes[bench]'): no e2e.png")
    return 0


def plot(results: dict, path: Path) -> None:
    """Per model: decode-step and router + routing speedups over stock Inductor, against T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (steps, routers) = plt.subplots(1, 2, figsize=(11, 5.6))
    all_tokens = sorted({row["T"] for row in results["rows"]})
    for model_id in dict.fromkeys(row["model"] for row in results["rows"]):
        rows = [row for row in results["rows"] if row["model"] == model_id]
        layers = rows[0]["layers"]
        model = f"{model_id.removeprefix('bench-').removeprefix('smoke-')} ({layers} layer{'s' * (layers != 1)})"
        tokens = [row["T"] for row in rows]
        line = steps.plot(tokens, [row["step_speedup"] for row in rows], marker="o", label=model)
        routers.plot(tokens, [row["router_routing_speedup"] for row in rows], marker="o", color=line[0].get_color())
        if all("router_routing_kernel_speedup" in row for row in rows):
            routers.plot(
                tokens,
                [row["router_routing_kernel_speedup"] for row in rows],
                marker="s",
                linestyle="--",
                color=line[0].get_color(),
            )
    for ax, title in (
        (steps, "whole decode step"),
        (routers, "router + routing of a layer\n(solid: wall time of the chain; dashed: profiler kernel time)"),
    ):
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
        ax.minorticks_off()
        ax.set_xlabel("tokens T")
        ax.set_ylabel("speedup over stock Inductor")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    fig.legend(*steps.get_legend_handles_labels(), loc="lower center", ncol=4, frameon=False)
    meta = results["meta"]
    pdl = ", Inductor PDL on" if meta.get("inductor_pdl") else ""
    replays = f"{meta['replays']} " if "replays" in meta else ""  # older results did not record it
    fig.suptitle(
        f"fusion_passes vs stock Inductor on {meta['device']} (torch {meta['torch']}{pdl})\n"
        f"bf16 decode, median of {replays}CUDA-graph replays; above 1 = faster"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
