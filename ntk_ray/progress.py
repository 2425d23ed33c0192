"""Progress lines on stderr and per-stage wall times (the manifest's ``stage_seconds``)."""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    """Per-stage progress lines and wall times."""

    def __init__(self, stream=None, clock=time.time):
        self.stream = stream
        self.clock = clock
        self.times: dict[str, float] = {}
        self.started = clock()
        self._stage: tuple[str, float] | None = None

    def seconds(self) -> dict[str, float]:
        """Wall seconds per finished stage, the running stage so far, and ``setup``: the time
        outside any stage (input checks, Ray start or connect)."""
        now = self.clock()
        out = dict(self.times)
        if self._stage is not None:
            out[self._stage[0]] = round(now - self._stage[1], 3)
        out["setup"] = round(now - self.started - sum(out.values()), 3)
        return out

    def log(self, message: str) -> None:
        print(f"[ntk-ray {self.clock() - self.started:7.1f}s] {message}", file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = self.clock()
        self._stage = (name, t0)
        self.log(f"{name}: start")
        try:
            yield self
        finally:
            self._stage = None
            self.times[name] = round(self.clock() - t0, 3)
        self.log(f"{name}: done in {self.times[name]:.1f}s")
