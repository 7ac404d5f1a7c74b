"""CUDA-graph timing shared by the benchmarks."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def captured(fn: Callable[[], object], calls_per_graph: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls_per_graph`` calls of ``fn``, warmed up (three calls on a side
    stream before the capture, three replays after it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    for _ in range(3):
        graph.replay()
    return graph


def graph_times_us(
    fns: dict[str, Callable[[], object]],
    calls_per_graph: int = 1,
    replays_per_sample: int = 5,
    samples: int = 15,
    before_sample: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median µs per call of each function: each captured ``calls_per_graph`` times into its
    own CUDA graph; a sample times ``replays_per_sample`` back-to-back replays with CUDA
    events. The functions' samples alternate, so a drift in clocks or temperature during the
    run reaches them all alike. ``before_sample`` runs ahead of each sample (a cross-rank
    barrier, in multi-GPU runs)."""
    graphs = {name: captured(fn, calls_per_graph) for name, fn in fns.items()}
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(samples):
        for name, graph in graphs.items():
            if before_sample is not None:
                before_sample()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays_per_sample):
                graph.replay()
            end.record()
            end.synchronize()
            per_call[name].append(start.elapsed_time(end) * 1e3 / (replays_per_sample * calls_per_graph))
    return {name: statistics.median(times) for name, times in per_call.items()}


def graph_time_per_call_us(fn: Callable[[], object], *args, **kwargs) -> float:
    """``graph_times_us`` of one function."""
    return graph_times_us({"fn": fn}, *args, **kwargs)["fn"]


def profiled_kernels_per_call(fn: Callable[[], object], calls_per_graph: int = 20, replays: int = 5) -> dict:
    """GPU time and kernel count per call of ``fn`` from the profiler: the durations of the
    kernels (memsets and copies included) recorded while a graph of ``calls_per_graph`` calls
    replays. Launch gaps are not in it, so this is what the call's kernels cost wherever they
    run, next to what ``graph_time_per_call_us`` says a back-to-back chain of them takes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    graph = captured(fn, calls_per_graph)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not kernels:
        raise RuntimeError("the profiler recorded no GPU activity inside the CUDA graph (CUPTI unavailable?)")
    calls = calls_per_graph * replays
    names: dict[str, float] = {}
    for e in kernels:
        names[e.name] = names.get(e.name, 0.0) + e.time_range.elapsed_us() / calls
    return {
        "us": sum(names.values()),
        "kernels": len(kernels) / calls,
        "by_kernel_us": dict(sorted(names.items(), key=lambda item: -item[1])),
    }
