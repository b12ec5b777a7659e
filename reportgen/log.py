"""Progress and timers on stderr."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Timer:
    def __init__(self):
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


def log(opts, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


def progress(opts, what: str = "ACT step"):
    """Progress on an interactive stderr (a real-size model takes minutes on a CPU)."""
    if opts.quiet or not sys.stderr.isatty():
        return None

    def show(step: int, total: int) -> None:
        print(f"\r  {what} {step}/{total}", end="\n" if step == total else "", file=sys.stderr, flush=True)

    return show


