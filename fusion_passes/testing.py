"""Helpers for users' CI: assert how many matches each pass made."""

from __future__ import annotations

from .config import PASS_NAMES
from .report import Report


def count_mismatches(report: Report, expected: dict[str, int]) -> list[str]:
    """Readable lines for every pass whose count differs from ``expected`` (passes not
    named in ``expected`` are not checked)."""
    unknown = sorted(set(expected) - set(PASS_NAMES))
    if unknown:
        raise ValueError(f"unknown pass names {unknown}; passes are {list(PASS_NAMES)}")
    counts = report.counts
    return [
        f"  {name}: expected {want}, got {counts[name]}"
        for name, want in expected.items()
        if counts[name] != want
    ]


def assert_matches(report: Report, **expected: int) -> None:
    """``assert_matches(backend.report, router_gemm=4, nan_safe_routing=4)``; fails with
    a diff of the counts and the per-graph table."""
    mismatches = count_mismatches(report, expected)
    if mismatches:
        raise AssertionError(
            "fusion_passes match counts differ:\n" + "\n".join(mismatches) + "\n\nper graph:\n" + report.table()
        )


def _short(target) -> str:
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_schema"):
        name = str(target._schema.name).replace("::", ".") + ("" if target._overloadname == "default" else "." + target._overloadname)
    return name


def _describe_value(value) -> str:
    import torch

    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe_value(v) for v in value) + ")"
    if not isinstance(value, torch.Tensor):
        return ""
    dtype = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64", torch.bool: "b8"}.get(
        value.dtype, str(value.dtype)
    )
    dims = ", ".join(str(d) if isinstance(d, int) else "s" for d in value.shape)
    return f"{dtype}[{dims}]"


def render_region(graph, targets) -> str:
    """A version-stable text of the graph around the calls of ``targets``: those calls,
    the nodes that feed them, their getitems and the nodes that consume those, in graph
    order, named by op and counter (node names differ between torch versions). For
    golden-graph tests."""
    import operator

    import torch.fx

    core = [n for n in graph.nodes if n.op == "call_function" and n.target in targets]
    region = set(core)
    for node in core:
        region.update(node.all_input_nodes)
        for user in node.users:
            region.add(user)
            if user.target is operator.getitem:
                region.update(user.users)
    region = {n for n in region if n.op != "output"}

    names: dict = {}
    counters: dict = {}
    for node in graph.nodes:
        if node in region:
            if node.op in ("placeholder", "get_attr"):
                base = "input"
            elif node.target is operator.getitem:
                base = "getitem"
            else:
                base = node.target._schema.name.split("::")[1] if hasattr(node.target, "_schema") else _short(node.target)
            names[node] = f"{base}_{counters.setdefault(base, 0)}"
            counters[base] += 1

    def show(a):
        if isinstance(a, torch.fx.Node):
            return names.get(a, "...")
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(show(x) for x in a) + "]"
        return repr(a)

    lines = []
    for node in graph.nodes:
        if node in region and node.op == "call_function":
            args = ", ".join([show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()])
            target = "getitem" if node.target is operator.getitem else _short(node.target)
            lines.append(f"{names[node]}: {_describe_value(node.meta.get('val'))} = {target}({args})")
    return "\n".join(lines)
