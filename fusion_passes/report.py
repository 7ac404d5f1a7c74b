"""Match reports: how many times each pass fired, per graph and in total."""

from __future__ import annotations

import dataclasses
import json

from .config import PASS_NAMES

COUNTER_PREFIX = "fusion_passes."


@dataclasses.dataclass
class GraphReport:
    """One graph Dynamo produced (a graph break or recompile adds another)."""

    index: int
    counts: dict[str, int]
    # Inductor served the graph from its FX-graph cache: the passes did not run in this
    # process, and the counts are the ones recorded when the cached graph was compiled.
    cache_hit: bool = False
    dump_dir: str | None = None


@dataclasses.dataclass
class Report:
    graphs: list[GraphReport] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Matches per pass summed over every graph; every pass has a key."""
        return {name: sum(g.counts.get(name, 0) for g in self.graphs) for name in PASS_NAMES}

    def per_graph(self) -> list[dict[str, int]]:
        return [dict(g.counts) for g in self.graphs]

    def table(self) -> str:
        header = ["pass"] + [f"graph {g.index}" for g in self.graphs] + ["total"]
        rows = []
        for name in PASS_NAMES:
            # A pass that did not run on a graph (turned off) has no key there: "off", not 0.
            cells = [str(g.counts[name]) if name in g.counts else "off" for g in self.graphs]
            ran = any(name in g.counts for g in self.graphs) or not self.graphs
            rows.append([name] + cells + [str(self.counts[name]) if ran else "off"])
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
        hits = [g.index for g in self.graphs if g.cache_hit]
        if hits:
            lines.append(f"(graphs {hits} came from Inductor's FX-graph cache; counts recorded at their compilation)")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"counts": self.counts, "graphs": [dataclasses.asdict(g) for g in self.graphs]}, indent=2)
