"""Graph dumps: each compiled graph before and after each pass, as readable code.

Layout of a dump directory::

    summary.json                     counts per pass, in total and per graph
    graph_000/00_router_gemm.before.py
    graph_000/00_router_gemm.after.py
    graph_000/01_nan_safe_routing.before.py
    ...

The same graphs are emitted as TORCH_TRACE artifacts (``fusion_passes_<pass>_before``
/ ``_after``), so ``tlparse`` shows them next to Inductor's own.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from torch._logging import trace_structured
from torch.fx import Graph

from .config import PASS_NAMES

SUMMARY = "summary.json"


def readable(graph: Graph) -> str:
    module = graph.owning_module
    if module is None:
        return str(graph)
    return module.print_readable(print_output=False, include_stride=True, include_device=True)


def emit_trace(graph: Graph, pass_name: str, stage: str) -> None:
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"fusion_passes_{pass_name}_{stage}", "encoding": "string"},
        payload_fn=lambda: readable(graph),
    )


def graph_dir(root: str | os.PathLike, index: int) -> Path:
    return Path(root) / f"graph_{index:03d}"


def write_stage(root, index: int, step: int, pass_name: str, stage: str, graph: Graph) -> None:
    directory = graph_dir(root, index)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{step:02d}_{pass_name}.{stage}.py").write_text(readable(graph))


def update_summary(root, index: int, counts: dict[str, int], **extra) -> None:
    """Record one graph's counts in ``summary.json`` (rewritten whole, totals included)."""
    path = Path(root) / SUMMARY
    summary = json.loads(path.read_text()) if path.exists() else {"graphs": []}
    graphs = [g for g in summary["graphs"] if g["index"] != index]
    graphs.append({"index": index, "dir": graph_dir(root, index).name, "counts": counts, **extra})
    graphs.sort(key=lambda g: g["index"])
    totals = {name: sum(g["counts"].get(name, 0) for g in graphs) for name in PASS_NAMES}
    path.write_text(json.dumps({"counts": totals, "graphs": graphs}, indent=2) + "\n")


def describe(root) -> str:
    """The summary of a dump directory as a table."""
    from .report import GraphReport, Report

    path = Path(root) / SUMMARY
    if not path.exists():
        raise FileNotFoundError(f"{root} has no {SUMMARY}: is it a fusion_passes dump directory?")
    summary = json.loads(path.read_text())
    report = Report([GraphReport(g["index"], g["counts"], g.get("cache_hit", False), g["dir"]) for g in summary["graphs"]])
    return f"dump: {Path(root).resolve()}\n" + report.table()


def diff(root, pass_name: str, index: int | None = None) -> str:
    """Unified diff of the graphs before and after ``pass_name`` (every graph, or one)."""
    if pass_name not in PASS_NAMES:
        raise ValueError(f"unknown pass {pass_name!r}; passes are {list(PASS_NAMES)}")
    dirs = sorted(Path(root).glob("graph_*")) if index is None else [graph_dir(root, index)]
    out = []
    for directory in dirs:
        for before in sorted(directory.glob(f"*_{pass_name}.before.py")):
            after = before.with_name(before.name.replace(".before.py", ".after.py"))
            lines = difflib.unified_diff(
                before.read_text().splitlines(keepends=True),
                after.read_text().splitlines(keepends=True) if after.exists() else [],
                fromfile=str(before),
                tofile=str(after),
                n=2,
            )
            out.append("".join(lines) or f"# {directory.name}: {pass_name} changed nothing\n")
    if not out:
        raise FileNotFoundError(f"no dumps of pass {pass_name!r} under {root}")
    return "\n".join(out)
