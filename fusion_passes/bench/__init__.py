"""Benchmarks behind ``fusion-passes bench NAME``: each module ``NAME`` (dashes become
underscores) has ``main(argv: list[str]) -> int``; modules named ``_*`` are shared helpers."""

import ast
import pkgutil
from pathlib import Path


def available() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def describe() -> list[tuple[str, str]]:
    """(name, first sentence of the module's docstring, as plain text) for each
    benchmark, read from the source so that listing them imports none of them (they
    import torch and CUDA helpers)."""
    out = []
    for name in available():
        source = (Path(__path__[0]) / f"{name.replace('-', '_')}.py").read_text()
        paragraph = (ast.get_docstring(ast.parse(source)) or "").split("\n\n", 1)[0]
        text = " ".join(paragraph.split()).replace("`", "").removeprefix(f"fusion-passes bench {name}: ")
        sentence = text.split(". ", 1)[0].rstrip(".")
        if len(sentence) > 90 and ", " in sentence[:90]:  # one line of help: the first clauses
            sentence = sentence[: sentence.rindex(", ", 0, 90)]
        out.append((name, sentence))
    return out
