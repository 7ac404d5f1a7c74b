"""What a long CLI command is doing, on stderr: a line per step, a bar where the total
is known (tqdm's when it is installed, plain lines otherwise).

Shown when stderr is a terminal, or when asked: ``--progress`` on the command line or
``FUSION_PASSES_PROGRESS=1`` (``0`` turns it off, also on a terminal). Nothing goes to
stdout, so the command's output stays the same when it is parsed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

ENV = "FUSION_PASSES_PROGRESS"


def wanted(asked: bool | None = None) -> bool:
    """``asked`` (the command-line flag) if given, else the environment, else whether
    stderr is a terminal."""
    if asked is not None:
        return asked
    setting = os.environ.get(ENV, "").strip()
    if setting:
        return setting != "0"
    return sys.stderr.isatty()


class Progress:
    def __init__(self, prefix: str, enabled: bool):
        self.prefix = prefix
        self.enabled = enabled
        self.start = time.perf_counter()

    def step(self, message: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"{self.prefix}: [{elapsed:5.1f} s] {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def bar(self, total: int, description: str):
        """Yields ``advance(message)``, to call once per finished item of ``total``."""
        if not self.enabled:
            yield lambda message="": None
            return
        try:
            from tqdm import tqdm
        except ImportError:
            done = [0]

            def advance(message: str = "") -> None:
                done[0] += 1
                self.step(f"{description} {done[0]}/{total}" + (f": {message}" if message else ""))

            yield advance
            return
        with tqdm(total=total, desc=f"{self.prefix}: {description}", file=sys.stderr, leave=False) as bar:

            def advance(message: str = "") -> None:
                if message:
                    bar.set_postfix_str(message)
                bar.update(1)

            yield advance
