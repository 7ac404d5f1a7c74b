"""Benchmarks behind ``fusion-passes bench NAME``: each module ``NAME`` (dashes become
underscores) has ``main(argv: list[str]) -> int``; modules named ``_*`` are shared helpers."""

import pkgutil


def available() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
