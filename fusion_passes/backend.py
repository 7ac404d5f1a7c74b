"""The torch.compile backend: Inductor with the pass manager installed.

    torch.compile(model, backend="fusion_passes")              # by name (entry point)
    backend = fusion_passes.Backend(fusion_passes.PassConfig(router_gemm=False))
    torch.compile(model, backend=backend); backend.report.counts
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from .config import PASS_NAMES, PassConfig
from .manager import PassManager, compiling_graph
from .report import COUNTER_PREFIX, GraphReport, Report

_last_report: Report | None = None


class Backend:
    """A torch.compile backend: compiles every graph Dynamo hands over with Inductor,
    with the fusion passes as Inductor's post-grad custom pass, and counts the matches
    per graph in ``self.report`` (graph breaks and recompiles add graphs)."""

    def __init__(self, config: PassConfig | None = None):
        self.config = config or PassConfig()
        self.report = Report()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        global _last_report
        installed = inductor_config.post_grad_custom_post_pass
        if isinstance(installed, PassManager):  # our own, from an enclosing compile
            installed = installed.user_pass
        manager = PassManager(self.config, user_pass=installed)
        _apply_runtime_settings(self.config)

        index = len(self.report.graphs)
        before = counters["inductor"].copy()
        with compiling_graph(index) as context:
            compiled = compile_fx(gm, example_inputs, config_patches={"post_grad_custom_post_pass": manager})
        # Read the counts from Inductor's counters rather than from the passes: on an
        # FX-graph cache hit the passes do not run, and Inductor replays the counter
        # increments recorded when the cached graph was compiled.
        delta = counters["inductor"] - before
        graph_counts = {name: delta.get(COUNTER_PREFIX + name, 0) for name in PASS_NAMES}
        self.report.graphs.append(
            GraphReport(index, graph_counts, cache_hit=not context.ran, dump_dir=self.config.resolved_dump_dir())
        )
        _last_report = self.report
        return compiled


def _apply_runtime_settings(config: PassConfig) -> None:
    """Settings the inserted ops read at run time, not at compile time."""
    if config.router_gemm_max_tokens is not None:
        from . import kernels

        kernels.set_router_gemm_max_tokens(config.router_gemm_max_tokens)


_by_name = Backend()


def fusion_passes_backend(gm, example_inputs, **kwargs):
    """``torch.compile(model, backend="fusion_passes")``: all passes on, default config.
    Its report accumulates over every graph compiled by name until ``reset()``."""
    return _by_name(gm, example_inputs)


def reset() -> None:
    """Start a new report for the by-name backend."""
    global _by_name, _last_report
    _by_name = Backend()
    _last_report = None


def last_report() -> Report | None:
    """The report of the most recent compilation in this process: the by-name
    backend's, or the last ``Backend`` object's that compiled a graph."""
    return _last_report
