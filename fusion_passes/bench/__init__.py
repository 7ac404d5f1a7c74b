"""Benchmarks behind ``fusion-passes bench NAME``: each module ``NAME`` (dashes become
underscores) has ``main(argv: list[str]) -> int``."""
