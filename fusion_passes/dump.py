"""Graph dumps: each compiled graph before and after each pass, as readable code.

Layout of a dump directory::

    summary.json                     counts per pass, in total and per graph
    graph_000/00_router_gemm.before.py
    graph_000/00_router_gemm.after.py
    graph_000/01_nan_safe_routing.before.py
    ...
    graph_extra_000/...              graphs compiled outside a Backend call (a backward
                                     graph, or the pass manager installed in Inductor's
                                     config directly)

A Backend's first graph clears the dumps of an earlier compilation in the same
directory, so the summary always describes one compilation.

The same graphs are emitted as TORCH_TRACE artifacts (``fusion_passes_<pass>_before``
/ ``_after``), so ``tlparse`` shows them next to Inductor's own.
"""

from __future__ import annotations

import difflib
import json
import shutil
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


def graph_dir_name(index: int) -> str:
    """Directory of the backend's graph ``index``."""
    return f"graph_{index:03d}"


def clear(root) -> None:
    """Remove an earlier compilation's dumps (only what this module writes)."""
    root = Path(root)
    (root / SUMMARY).unlink(missing_ok=True)
    for directory in root.glob("graph_*"):
        shutil.rmtree(directory, ignore_errors=True)


def write_stage(root, name: str, step: int, pass_name: str, stage: str, graph: Graph) -> None:
    directory = Path(root) / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{step:02d}_{pass_name}.{stage}.py").write_text(readable(graph))


def update_summary(root, name: str, counts: dict[str, int]) -> None:
    """Record one graph's counts in ``summary.json`` (rewritten whole, totals included)."""
    path = Path(root) / SUMMARY
    summary = json.loads(path.read_text()) if path.exists() else {"graphs": []}
    graphs = [g for g in summary["graphs"] if g["dir"] != name]
    graphs.append({"dir": name, "counts": counts})
    graphs.sort(key=lambda g: g["dir"])
    totals = {name: sum(g["counts"].get(name, 0) for g in graphs) for name in PASS_NAMES}
    path.write_text(json.dumps({"counts": totals, "graphs": graphs}, indent=2) + "\n")


def read_summary(root) -> dict:
    """``summary.json`` of the dump directory ``root``, checked: a FileNotFoundError or
    ValueError that names the path says what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a directory")
    path = root / SUMMARY
    if not path.exists():
        raise FileNotFoundError(f"{root} has no {SUMMARY}: is it a fusion_passes dump directory?")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    graphs = summary.get("graphs") if isinstance(summary, dict) else None
    if not isinstance(graphs, list) or not all(
        isinstance(g, dict) and isinstance(g.get("dir"), str) and isinstance(g.get("counts"), dict) for g in graphs
    ):
        raise ValueError(f'{path} is not a fusion_passes summary: expected {{"graphs": [{{"dir": ..., "counts": ...}}]}}')
    return summary


def describe(root) -> str:
    """The summary of a dump directory as a table (``off``: a pass that was disabled)."""
    from .report import GraphReport, Report

    graphs = read_summary(root)["graphs"]
    report = Report([GraphReport(i, g["counts"], dump_dir=g["dir"]) for i, g in enumerate(graphs)])
    names = ", ".join(f"graph {i} = {g['dir']}" for i, g in enumerate(graphs))
    return f"dump: {Path(root).resolve()} ({names})\n" + report.table()


def _graph_dirs(root) -> list[Path]:
    """The graph directories in the order ``describe`` numbers them (summary.json's)."""
    return [Path(root) / g["dir"] for g in read_summary(root)["graphs"]]


def diff(root, pass_name: str, index: int | None = None) -> str:
    """Unified diff of the graphs before and after ``pass_name``: every graph, or graph
    ``index`` as ``describe`` numbers it (graph_extra_* directories included)."""
    if pass_name not in PASS_NAMES:
        raise ValueError(f"unknown pass {pass_name!r}; passes are {list(PASS_NAMES)}")
    dirs = _graph_dirs(root)
    if index is not None:
        if not 0 <= index < len(dirs):
            raise ValueError(f"{root} has no graph {index}; its graphs are 0..{len(dirs) - 1}")
        dirs = [dirs[index]]
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
