"""The torch.compile backend: Inductor with the pass manager installed.

    torch.compile(model, backend="fusion_passes")              # by name (entry point)
    backend = fusion_passes.Backend(fusion_passes.PassConfig(router_gemm=False))
    torch.compile(model, backend=backend); backend.report.counts
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from . import dump
from .config import PassConfig
from .manager import PassManager, compiling_graph
from .report import COUNTER_PREFIX, GraphReport, Report

_last_report: Report | None = None


class Backend:
    """A torch.compile backend: compiles every graph Dynamo hands over with Inductor,
    with the fusion passes as Inductor's post-grad custom pass, and counts the matches
    per graph in ``self.report`` (graph breaks and recompiles add graphs)."""

    def __init__(self, config: PassConfig | Mapping | None = None, *, codegen: bool = True):
        """``config``: a PassConfig, None for the defaults, or a mapping of PassConfig
        fields (``Backend({"router_gemm": False})``).

        ``codegen=False`` runs the passes but not Inductor's code generation: the
        rewritten post-grad graph runs as is (the ops through their dispatch). It
        reports the same counts. It saves Inductor's lowering, code generation and the
        C++/Triton compile of the generated code; Dynamo, AOT autograd and the passes run
        as before (docs/architecture.md gives measured times). For match-count checks in
        CI, not for speed of the compiled model."""
        if not isinstance(codegen, bool):
            raise ValueError(f"Backend(codegen=...) must be a bool, got {codegen!r}")
        self.config = PassConfig.coerce(config)
        self.codegen = codegen
        self.report = Report()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        global _last_report
        installed = inductor_config.post_grad_custom_post_pass
        if isinstance(installed, PassManager):  # our own, from an enclosing compile
            installed = installed.user_pass
        manager = PassManager(self.config, user_pass=installed)
        if any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
            # Build/load the kernels now, not on the first call, which may be inside a
            # CUDA-graph capture.
            from . import kernels

            kernels.load()
        _apply_runtime_settings(self.config)

        index = len(self.report.graphs)
        dump_dir = self.config.resolved_dump_dir()
        if dump_dir and index == 0:
            dump.clear(dump_dir)
        before = counters["inductor"].copy()
        with compiling_graph(index) as context:
            compiled = compile_fx(
                gm,
                example_inputs,
                config_patches={"post_grad_custom_post_pass": manager},
                **({} if self.codegen else {"inner_compile": _post_grad_passes_only}),
            )
        # Read the counts from Inductor's counters rather than from the passes: on an
        # FX-graph cache hit the passes do not run, and Inductor replays the counter
        # increments recorded when the cached graph was compiled.
        delta = counters["inductor"] - before
        # Only the passes that ran have a key: the report shows the others as "off".
        graph_counts = {name: delta.get(COUNTER_PREFIX + name, 0) for name in self.config.enabled_passes()}
        self.report.graphs.append(
            GraphReport(index, graph_counts, cache_hit=not context.ran, dump_dir=dump_dir)
        )
        _last_report = self.report
        return compiled


def _post_grad_passes_only(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """An Inductor ``inner_compile`` that stops after the post-grad passes (ours among
    them) and returns the rewritten graph to run as is."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import fake_tensor_prop
    from torch._inductor.fx_passes.post_grad import post_grad_passes, view_to_reshape
    from torch._inductor.virtualized import V

    view_to_reshape(gm)
    with torch.no_grad():
        fake_mode = fake_tensor_prop(gm, example_inputs)
    with V.set_fake_mode(fake_mode):
        post_grad_passes(gm, is_inference=kwargs.get("is_inference", False))
    gm.recompile()
    return make_boxed_func(gm.forward)


def _apply_runtime_settings(config: PassConfig) -> None:
    """Settings the inserted ops read at run time, not at compile time."""
    if config.router_gemm_max_tokens is not None:
        from . import kernels

        kernels.set_router_gemm_max_tokens(config.router_gemm_max_tokens)
    if config.allreduce_max_tokens is not None:
        from . import fused_allreduce

        fused_allreduce.set_max_tokens(config.allreduce_max_tokens)


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
