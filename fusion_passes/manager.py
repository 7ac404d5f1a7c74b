"""The pass manager: an Inductor post-grad custom pass that runs the enabled passes.

It is installed as ``post_grad_custom_post_pass``: after Inductor's own post-grad
pattern passes have normalised the graph (no-op views removed, its own fusions
done), and before lowering. At that point the graph is the ATen the kernels will be
generated from, still functional (collectives are ``all_reduce`` + ``wait_tensor``,
not yet re-inplaced), so the patterns see one stable form, and nothing Inductor
does afterwards can undo a rewrite (the inserted ops are opaque to it).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import itertools
import json
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from . import __version__, dump
from .config import PassConfig
from .passes import PASSES
from .report import COUNTER_PREFIX

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass
class GraphContext:
    """What the backend tells the manager about the graph being compiled."""

    name: str  # the graph's dump directory
    ran: bool = False


_graph_context: contextvars.ContextVar[GraphContext | None] = contextvars.ContextVar(
    "fusion_passes_graph", default=None
)
_standalone_index = itertools.count()


@contextlib.contextmanager
def compiling_graph(index: int):
    context = GraphContext(dump.graph_dir_name(index))
    token = _graph_context.set(context)
    try:
        yield context
    finally:
        _graph_context.reset(token)


@functools.cache
def _source_hash() -> str:
    """Hash of the sources that decide what the passes do."""
    files = sorted(PACKAGE_DIR.glob("passes/*.py")) + [PACKAGE_DIR / n for n in ("ops.py", "config.py", "manager.py")]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class PassManager(CustomGraphPass):
    """Runs the passes ``config`` enables, then ``user_pass`` (a custom pass that was
    already installed in the same Inductor slot, which this one would otherwise replace)."""

    def __init__(self, config: PassConfig | None = None, user_pass=None):
        self.config = config or PassConfig()
        self.user_pass = user_pass
        # torch >= 2.13 also accepts a list of passes in the slot.
        self._user_passes = (
            tuple(user_pass) if isinstance(user_pass, (list, tuple)) else (user_pass,) * (user_pass is not None)
        )

    def __call__(self, graph: Graph) -> None:
        context = _graph_context.get()
        if context is None:
            context = GraphContext(f"graph_extra_{next(_standalone_index):03d}")
        context.ran = True
        dump_dir = self.config.resolved_dump_dir()
        counts = {}
        for step, name in enumerate(self.config.enabled_passes()):
            self._record(graph, dump_dir, context.name, step, name, "before")
            counts[name] = PASSES[name].apply(graph, self.config)
            if counts[name]:
                graph.lint()
            counters["inductor"][COUNTER_PREFIX + name] += counts[name]
            self._record(graph, dump_dir, context.name, step, name, "after")
        if dump_dir:
            dump.update_summary(dump_dir, context.name, counts)
        for user_pass in self._user_passes:
            user_pass(graph)

    @staticmethod
    def _record(graph, dump_dir, graph_name, step, pass_name, stage):
        dump.emit_trace(graph, pass_name, stage)
        if dump_dir:
            dump.write_stage(dump_dir, graph_name, step, pass_name, stage, graph)

    def uuid(self) -> str | None:
        if self.config.resolved_dump_dir():
            return None  # a cache hit would skip the passes and write no dumps
        user_uuids = [p.uuid() if hasattr(p, "uuid") else None for p in self._user_passes]
        if None in user_uuids:
            return None  # an uncacheable user pass makes the whole slot uncacheable
        key = {
            "version": __version__,
            "torch": torch.__version__,
            "sources": _source_hash(),
            "config": self.config.cache_key(),
            "user_passes": repr(user_uuids),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()
