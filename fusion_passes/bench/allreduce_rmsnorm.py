"""`fusion-passes bench allreduce-rmsnorm`: the fused all-reduce + residual add + RMSNorm against
what a model runs without it, on the GPUs of one host, in CUDA-graph replay.

    fusion-passes bench allreduce-rmsnorm [--nproc 2] [--hidden 2880] [--tokens 1,8,...] \\
        [--decode-steps] [--out DIR]
    fusion-passes bench allreduce-rmsnorm --local-norm [--hidden 2880,4096,7168] \
        [--dtypes bf16,fp32] [--layouts rows8_persistent_pdl,block_per_row,...]
    fusion-passes bench allreduce-rmsnorm --replot results.json [--out DIR]   # no GPU needed

``--local-norm`` times, on one GPU, only the NCCL path's add + RMSNorm kernel, in each of the
``--layouts`` (LOCAL_LAYOUTS), against Inductor's compiled add + RMSNorm, in one timing loop.

It starts itself under torchrun with ``--nproc`` processes unless already launched by it. Keep
``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` set where multicast must stay
off; the children inherit the environment.

Per token count T, bf16 x of [T, H] with a residual, each variant captured CALLS_PER_GRAPH times
into one CUDA graph; a sample is a few back-to-back replays after a barrier, and the number is
the median µs per call of the slower rank:

    fused                 fusion_passes::fused_allreduce_rmsnorm, the op's own choice of path
    fused_one_shot        ... forced to one path (where the workspace holds x)
    fused_two_shot
    fused_nccl
    nccl+norm             NCCL all-reduce (c10d functional) + Inductor's compiled add + RMSNorm
    symm_one_shot+norm    torch symmetric memory one_shot_all_reduce + the same compiled norm
    symm_two_shot+norm    torch symmetric memory two_shot_all_reduce_ (in place) + that norm
    symm_two_shot+fused_norm  the same two-shot + the NCCL path's add + RMSNorm kernel

``--decode-steps`` also times whole decode steps of the tensor-parallel built-in gpt-oss
(4 layers, H=2880, E=32, top-4, bf16) for T = 1..64, stock Inductor against fusion_passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

CALLS_PER_GRAPH = 50
REPLAYS_PER_SAMPLE, SAMPLES = 4, 9
DEFAULT_TOKENS = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192"
DECODE_TOKENS = "1,2,4,8,16,32,64"
EPS = 1e-5
# Targets of the issue (H=2880, bf16, 2 GPUs).
TARGET_SMALL_US, TARGET_SMALL_MAX_T = 5.0, 32
TARGET_128_US = 7.0
TARGET_MIN_SPEEDUP = 2.0


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    import subprocess

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "fusion_passes.bench.allreduce_rmsnorm",
        *argv,
    ]
    return subprocess.call(command)


def _compiled_add_rmsnorm():
    from fusion_passes.ops import rmsnorm_reference

    def add_rmsnorm(reduced, residual, weight):
        hidden = reduced + residual
        return rmsnorm_reference(hidden, weight, EPS), hidden

    return torch.compile(add_rmsnorm, dynamic=False)


def _slowest(value: float) -> float:
    t = torch.tensor([value], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure_ops(hidden: int, tokens: list[int], group_name: str) -> list[dict]:
    from torch.distributed import _symmetric_memory as symm_mem

    from fusion_passes import fused_allreduce
    from fusion_passes.bench._timing import graph_time_per_call_us

    rank = dist.get_rank()
    weight = torch.randn(hidden, dtype=torch.bfloat16, device="cuda")
    symm_buffer = symm_mem.empty(max(tokens) * hidden, dtype=torch.bfloat16, device="cuda")
    symm_mem.rendezvous(symm_buffer, group_name)
    rows = []
    for t in tokens:
        torch._dynamo.reset()  # a fresh compile per T: never the recompile limit's eager fallback
        norm = _compiled_add_rmsnorm()
        generator = torch.Generator("cuda").manual_seed(1000 * t + rank)
        x = torch.randn(t, hidden, dtype=torch.bfloat16, device="cuda", generator=generator)
        residual = torch.randn(t, hidden, dtype=torch.bfloat16, device="cuda", generator=generator)
        staged = symm_buffer[: t * hidden].view(t, hidden)
        ws = fused_allreduce.workspace(group_name, x.device)

        def fused(algorithm=None):
            return lambda: fused_allreduce.fused_allreduce_rmsnorm_cuda(x, residual, weight, EPS, group_name, algorithm)

        def nccl_norm():
            reduced = torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.all_reduce(x, "sum", group_name)
            )
            return norm(reduced, residual, weight)

        def symm_one_shot_norm():
            staged.copy_(x)
            return norm(torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", group_name), residual, weight)

        def symm_two_shot_norm():
            staged.copy_(x)
            torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", group_name)
            return norm(staged, residual, weight)

        out, residual_out = torch.empty_like(x), torch.empty_like(x)

        def symm_two_shot_fused_norm():  # a candidate large-T path (docs/notes/allreduce_rmsnorm.md)
            staged.copy_(x)
            torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", group_name)
            torch.ops.fusion_passes._fused_add_rmsnorm(staged, residual, weight, EPS, out, residual_out)

        variants = {
            "fused": fused(),
            "fused_nccl": fused(fused_allreduce.NCCL),
            "nccl+norm": nccl_norm,
            "symm_one_shot+norm": symm_one_shot_norm,
            "symm_two_shot+norm": symm_two_shot_norm,
            "symm_two_shot+fused_norm": symm_two_shot_fused_norm,
        }
        for algorithm in (fused_allreduce.ONE_SHOT, fused_allreduce.TWO_SHOT):
            if ws is not None and ws.fits(x, algorithm):
                variants[f"fused_{algorithm}"] = fused(algorithm)
        row = {"T": t, "H": hidden, "path": fused_allreduce.choose_algorithm(x, dist.get_world_size(), ws)}
        for name, fn in variants.items():
            try:
                us = graph_time_per_call_us(fn, CALLS_PER_GRAPH, REPLAYS_PER_SAMPLE, SAMPLES, before_sample=dist.barrier)
                row[name] = _slowest(us)
            except RuntimeError as exc:  # e.g. a torch symm_mem op refusing this size, on every rank
                row[name] = float("nan")
                if rank == 0:
                    print(f"T={t} {name}: {exc}", flush=True)
        row["speedup_vs_nccl_norm"] = row["nccl+norm"] / row["fused"]
        rows.append(row)
        if rank == 0:
            print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def measure_decode_steps(tokens: list[int], group: dist.ProcessGroup) -> list[dict]:
    import fusion_passes
    from fusion_passes.bench._timing import graph_time_per_call_us
    from fusion_passes.bench.e2e import BENCH_MODELS, register
    from fusion_passes.models import build_model

    cfg = BENCH_MODELS["gpt-oss-e32"]
    model = build_model(register(cfg), 4, dtype=torch.bfloat16, device="cuda", tp_group=group)
    steps = {}
    for name in ("inductor", "fusion_passes"):
        torch._dynamo.reset()
        backend = fusion_passes.Backend() if name == "fusion_passes" else "inductor"
        # Dynamo's automatic dynamic shapes: T=1 compiles static, T=2 once more with T dynamic.
        steps[name] = (torch.compile(model, backend=backend), backend)
    rows = []
    for t in tokens:
        ids = torch.randint(0, cfg.vocab_size, (t,), device="cuda", generator=torch.Generator("cuda").manual_seed(t))
        row = {"T": t}
        outputs = {}
        for name, (step, backend) in steps.items():
            with torch.no_grad():
                outputs[name] = step(ids)
                row[f"{name}_step_us"] = _slowest(
                    graph_time_per_call_us(lambda: step(ids), 1, 5, 9, before_sample=dist.barrier)
                )
            if name == "fusion_passes":
                row["counts"] = backend.report.counts
        a, b = outputs["inductor"].float(), outputs["fusion_passes"].float()
        row["relative_difference"] = ((a - b).norm() / a.norm()).item()
        row["speedup"] = row["inductor_step_us"] / row["fusion_passes_step_us"]
        rows.append(row)
        if dist.get_rank() == 0:
            print(
                f"decode T={t}: inductor {row['inductor_step_us']:.1f} us, fusion_passes "
                f"{row['fusion_passes_step_us']:.1f} us ({row['speedup']:.2f}x), counts {row['counts']}, "
                f"rel diff {row['relative_difference']:.1e}",
                flush=True,
            )
    return rows


# Layouts of the NCCL path's add + RMSNorm kernel that --local-norm can compare, as
# (chunks a lane, persistent grid, PDL launch); chunks 0 is the one-block-a-row kernel
# (csrc/allreduce_rmsnorm.cu, `set_local_layout`). The first is the shipped default.
LOCAL_LAYOUTS = {
    "rows8_persistent_pdl": (8, True, True),
    "block_per_row": (0, False, False),
    "rows16_persistent_pdl": (16, True, True),
    "rows4_persistent_pdl": (4, True, True),
    "rows2_persistent_pdl": (2, True, True),
    "rows8_persistent": (8, True, False),
    "rows8_pdl": (8, False, True),
    "rows2_pdl": (2, False, True),
    "rows8": (8, False, False),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def measure_local_norm(hiddens: list[int], dtypes: list[str], tokens: list[int], layouts: list[str]) -> list[dict]:
    """One GPU: the NCCL path's add + RMSNorm kernel (in each layout) against Inductor's compiled
    add + RMSNorm, on an input that is already reduced (what follows NCCL in both). The variants'
    samples alternate within one timing call, so they see the same clocks."""
    from fusion_passes.bench._timing import graph_times_us

    def kernel(layout, reduced, residual, weight, out, residual_out):
        def call():
            torch.ops.fusion_passes._fused_add_rmsnorm_set_layout(*LOCAL_LAYOUTS[layout])
            torch.ops.fusion_passes._fused_add_rmsnorm(reduced, residual, weight, EPS, out, residual_out)

        return call

    rows = []
    try:
        for dtype_name in dtypes:
            for hidden in hiddens:
                dtype = DTYPES[dtype_name]
                weight = torch.randn(hidden, dtype=dtype, device="cuda")
                for t in tokens:
                    torch._dynamo.reset()
                    norm = _compiled_add_rmsnorm()
                    reduced, residual = torch.randn(2, t, hidden, dtype=dtype, device="cuda")
                    out, residual_out = torch.empty_like(reduced), torch.empty_like(reduced)
                    variants = {name: kernel(name, reduced, residual, weight, out, residual_out) for name in layouts}
                    variants["inductor"] = lambda: norm(reduced, residual, weight)
                    times = graph_times_us(variants, CALLS_PER_GRAPH, 4, 9)
                    row = {"T": t, "H": hidden, "dtype": dtype_name, "inductor_add_rmsnorm_us": times["inductor"]}
                    for name in layouts:
                        row[f"{name}_us"] = times[name]
                        row[f"{name}_vs_inductor"] = times[name] / times["inductor"]
                    rows.append(row)
                    print(
                        " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                        flush=True,
                    )
    finally:
        torch.ops.fusion_passes._fused_add_rmsnorm_reset_layout()
    return rows


def targets_report(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        bound = TARGET_SMALL_US if row["T"] <= TARGET_SMALL_MAX_T else TARGET_128_US if row["T"] == 128 else None
        verdict = "faster" if row["fused"] <= row["nccl+norm"] else "SLOWER"
        line = f"T={row['T']}: fused {row['fused']:.2f} us, {row['speedup_vs_nccl_norm']:.2f}x NCCL+norm ({verdict})"
        if bound is not None:
            met = row["fused"] <= bound and row["speedup_vs_nccl_norm"] >= TARGET_MIN_SPEEDUP
            line += f"; target <= {bound} us and >= {TARGET_MIN_SPEEDUP}x: {'met' if met else 'NOT met'}"
        lines.append(line)
    return lines


# The plot's series: the op first (drawn last, on top), then what a model runs without it.
PLOT_SERIES = {
    "fused": "fused all-reduce + RMSNorm (this op, its own path choice)",
    "fused_one_shot": "this op, one-shot path forced",
    "fused_two_shot": "this op, two-shot path forced",
    "fused_nccl": "this op, NCCL path forced (NCCL + fused add-norm)",
    "nccl+norm": "NCCL all-reduce + Inductor add + RMSNorm (baseline)",
    "symm_one_shot+norm": "torch symm-mem one-shot + Inductor norm",
    "symm_two_shot+norm": "torch symm-mem two-shot + Inductor norm",
    "symm_two_shot+fused_norm": "torch symm-mem two-shot + this op's add-norm kernel",
}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusion_passes.bench.routing import readable_log_axes

    fig, ax = plt.subplots(figsize=(9, 5.5))
    headline = ("fused", "nccl+norm")
    # The op and the baseline first in the legend and on top (zorder), thick; the others thin and dashed.
    for name in list(headline) + [n for n in PLOT_SERIES if n not in headline]:
        points = [(row["T"], row[name]) for row in rows if name in row]
        if not points:
            continue
        is_headline = name in headline
        ax.plot(
            *zip(*points),
            marker="o" if is_headline else ".",
            markersize=6 if is_headline else 4,
            linewidth=2.8 if is_headline else 1.0,
            alpha=1.0 if is_headline else 0.6,
            linestyle="-" if is_headline else "--",
            color={"fused": "tab:red", "nccl+norm": "black"}.get(name),
            zorder=3 if is_headline else 2,
            label=PLOT_SERIES[name],
        )
    readable_log_axes(ax, sorted({row["T"] for row in rows}))
    ax.set_xlabel("tokens T (rows of x)")
    ax.set_ylabel("µs per call (lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_title(meta: dict, rows: list[dict]) -> str:
    """What the plot shows, in words: the op, the shape, the GPUs, torch, the method."""
    return (
        f"All-reduce + residual add + RMSNorm, x [T, {rows[0]['H']}] bf16, {meta['world_size']} x {meta['device']}, "
        f"torch {meta['torch']}\nCUDA-graph replay of {CALLS_PER_GRAPH} calls, median of {SAMPLES} samples, slower rank"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fusion-passes bench allreduce-rmsnorm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", default="2880", help="hidden size(s), comma-separated (several: --local-norm only)")
    parser.add_argument("--dtypes", default="bf16", help="--local-norm: x's dtypes, comma-separated: bf16, fp32, fp16")
    parser.add_argument(
        "--layouts",
        default=next(iter(LOCAL_LAYOUTS)),
        help=f"--local-norm: kernel layouts to compare, comma-separated, from {', '.join(LOCAL_LAYOUTS)}",
    )
    parser.add_argument("--tokens", default=DEFAULT_TOKENS)
    parser.add_argument("--decode-steps", action="store_true", help="also time TP gpt-oss decode steps")
    parser.add_argument("--decode-tokens", default=DECODE_TOKENS)
    parser.add_argument("--skip-ops", action="store_true", help="only the decode steps")
    parser.add_argument("--out", type=Path, default=Path("bench_out/allreduce_rmsnorm"))
    parser.add_argument("--local-norm", action="store_true", help="one GPU: only the NCCL path's add + norm kernel")
    parser.add_argument(
        "--replot", type=Path, default=None, metavar="JSON", help="only redraw allreduce_rmsnorm.png into --out from a results.json"
    )
    args = parser.parse_args(argv)
    if args.replot:
        results = json.loads(args.replot.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        plot(results["ops"], args.out / "allreduce_rmsnorm.png", plot_title(results["meta"], results["ops"]))
        print(f"wrote {args.out / 'allreduce_rmsnorm.png'}")
        return 0
    if args.local_norm:
        from fusion_passes import kernels

        if not kernels.load():
            raise SystemExit(f"the CUDA kernels did not load: {kernels.load_error()}")
        layouts = args.layouts.split(",")
        unknown = [name for name in layouts if name not in LOCAL_LAYOUTS]
        if unknown:
            raise SystemExit(f"unknown --layouts {unknown}; known: {', '.join(LOCAL_LAYOUTS)}")
        rows = measure_local_norm(
            [int(h) for h in args.hidden.split(",")],
            args.dtypes.split(","),
            [int(t) for t in args.tokens.split(",")],
            layouts,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "local_norm.json").write_text(
            json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, indent=2)
        )
        return 0
    if "," in args.hidden:
        raise SystemExit("--hidden takes one size without --local-norm")
    hidden = int(args.hidden)
    if "LOCAL_RANK" not in os.environ:
        if torch.cuda.device_count() < args.nproc:
            print(f"bench allreduce-rmsnorm: needs {args.nproc} CUDA GPUs (--nproc), found {torch.cuda.device_count()}", file=sys.stderr)
            return 2
        return _relaunch_under_torchrun(args.nproc, argv)

    from fusion_passes import kernels

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    if not kernels.load():
        raise SystemExit(f"the CUDA kernels did not load: {kernels.load_error()}")
    group = dist.group.WORLD
    results: dict = {
        "meta": {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(),
            "world_size": dist.get_world_size(),
            "argv": argv,
        }
    }
    if not args.skip_ops:
        rows = measure_ops(hidden, [int(t) for t in args.tokens.split(",")], group.group_name)
        results["ops"] = rows
        results["targets"] = targets_report(rows)
    if args.decode_steps:
        results["decode_steps"] = measure_decode_steps([int(t) for t in args.decode_tokens.split(",")], group)
    if dist.get_rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        if "ops" in results:
            print("\n".join(results["targets"]))
            plot(results["ops"], args.out / "allreduce_rmsnorm.png", plot_title(results["meta"], results["ops"]))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
