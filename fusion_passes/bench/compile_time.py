"""torch.compile wall time of a built-in model: stock Inductor vs Inductor + the passes.

    fusion-passes bench compile-time --model gpt-oss --layers 4 --repeats 3

Each measurement is a fresh process (cold Dynamo/Inductor state) with Inductor's
FX-graph and autotune caches off, so both sides compile everything; the time is the
first call of the compiled model (tracing + passes + codegen + C++/Triton compile).
Runs alternate between the two backends to spread machine noise. The time spent
inside the pass manager itself is measured too: it is the part of the difference
that the passes cost directly, free of that noise (the rest is Inductor compiling a
different graph, which with the routing collapsed into one op is usually smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from fusion_passes import progress

CHILD = """
import time, torch, fusion_passes
from fusion_passes.manager import PassManager
from fusion_passes.models import build_model, example_inputs
in_passes = [0.0]
run_passes = PassManager.__call__
def timed(self, graph):
    start = time.perf_counter()
    run_passes(self, graph)
    in_passes[0] += time.perf_counter() - start
PassManager.__call__ = timed
torch._inductor.config.fx_graph_cache = False
torch._inductor.config.autotune_local_cache = False
model = build_model({model!r}, {layers}, dtype=getattr(torch, {dtype!r}), device={device!r})
(ids,) = example_inputs(model, 8)
torch._dynamo.mark_dynamic(ids, 0)
backend = "inductor" if {backend!r} == "inductor" else fusion_passes.Backend()
start = time.perf_counter()
with torch.no_grad():
    torch.compile(model, backend=backend)(ids)
print(time.perf_counter() - start, in_passes[0])
"""


def measure(backend: str, args) -> tuple[float, float]:
    """(compile + first call seconds, seconds inside the pass manager)."""
    code = CHILD.format(model=args.model, layers=args.layers, dtype=args.dtype, device=args.device, backend=backend)
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    total, in_passes = out.stdout.strip().splitlines()[-1].split()
    return float(total), float(in_passes)


def main(argv: list[str]) -> int:
    from fusion_passes.cli import HelpFormatter, OneLineParser, at_least
    from fusion_passes.models import MODELS

    parser = OneLineParser(prog="fusion-passes bench compile-time", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="gpt-oss", choices=list(MODELS), help="built-in model")
    parser.add_argument("--layers", type=at_least(1), default=4, help="decoder layers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="fresh processes per backend (the median is shown)")
    parser.add_argument("--json", default=None, help="also write the raw times here")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"a bar on stderr (default: when stderr is a terminal, or ${progress.ENV}=1)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench compile-time: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2

    times = {"inductor": [], "fusion_passes": []}
    in_passes = []
    steps = progress.Progress("fusion-passes bench compile-time", progress.wanted(args.progress))
    with steps.bar(len(times) * args.repeats, "fresh-process compiles") as advance:
        for _ in range(args.repeats):
            for backend in times:
                total, passes = measure(backend, args)
                times[backend].append(total)
                if backend == "fusion_passes":
                    in_passes.append(passes)
                advance(f"{backend} {total:.1f} s")
    stock, ours = statistics.median(times["inductor"]), statistics.median(times["fusion_passes"])
    layers = f"{args.layers} layer" + ("" if args.layers == 1 else "s")
    print(f"{args.model}, {layers}, {args.dtype} on {args.device}, median of {args.repeats} fresh processes")
    print(f"  backend='inductor'      {stock:7.2f} s   {times['inductor']}")
    print(f"  backend=fusion_passes   {ours:7.2f} s   {times['fusion_passes']}")
    print(f"  overhead                {100 * (ours / stock - 1):+6.1f} %   (machine noise included)")
    passes = statistics.median(in_passes)
    print(f"  in the pass manager     {passes:7.3f} s   ({100 * passes / stock:.2f} % of the stock compile)")
    if args.json:
        with open(args.json, "w") as f:
            summary = {"args": vars(args), "times": times, "in_passes": in_passes, "overhead": ours / stock - 1}
            json.dump(summary, f, indent=2)
    return 0
