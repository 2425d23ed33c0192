"""Progress on stderr: stage lines, per-stage wall times (the manifest's ``stage_seconds``), and
rows done / total, rows/s and ETA while a stage runs.

Where the output goes decides how it looks:

* a terminal: a live tqdm bar per stage (``embed:  40%|####      | 400/1000 [00:30<00:45, 13.3rows/s]``);
* a file or a pipe (``ray job logs``, a KubeRay pod's log, ``| tee``): one plain line at most every
  ``interval`` seconds (``NTK_RAY_PROGRESS_INTERVAL``, default 30), and a last one when the stage's
  rows are done::

      [ntk-ray   120.4s] embed: 400/1000 rows (40%), 13.30 rows/s, ETA 00:45
      [ntk-ray   165.0s] embed: 1000/1000 rows in 01:15 (13.33 rows/s)

The rates and the ETA are tqdm's (its exponential moving average of the rate between two
lines; the last line: the stage's average). ``verbosity``: ``quiet`` prints nothing here (errors
and the final summary are the CLI's), ``normal`` the lines above, ``verbose`` the same (the
executor then also lets Ray's own logs and progress bars through).

Work that runs in another process (the warm-up task on a Ray worker) reports through
``Progress.from_spec(progress.spec())``: the same verbosity and interval, and the driver's start
time, so its lines carry the driver's clock; Ray forwards them to the driver's output.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass
from typing import Self

from tqdm import tqdm

VERBOSITIES = ("quiet", "normal", "verbose")


def default_interval() -> float:
    """Seconds between two progress lines in a log (``NTK_RAY_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("NTK_RAY_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


@dataclass(frozen=True)
class ProgressSpec:
    """What a worker process needs to report like the driver (picklable)."""
    verbosity: str
    started: float  # the driver's clock (time.time) at its start
    interval: float


class Progress:
    """Per-stage progress lines, wall times and row trackers (see the module docstring)."""

    def __init__(self, stream=None, clock=time.time, verbosity: str = "normal", interval: float | None = None,
                 tty: bool | None = None, started: float | None = None):
        if verbosity not in VERBOSITIES:
            raise ValueError(f"verbosity {verbosity!r}: choose {', '.join(VERBOSITIES)}")
        self.stream = stream
        self.clock = clock
        self.verbosity = verbosity
        self.interval = default_interval() if interval is None else float(interval)
        # decided once, now: the executor may later put a filter (a pipe) in front of stderr
        self.tty = _isatty(stream or sys.stderr) if tty is None else tty
        self.times: dict[str, float] = {}
        self.started = clock() if started is None else started
        self._stage: tuple[str, float] | None = None

    @property
    def quiet(self) -> bool:
        return self.verbosity == "quiet"

    @property
    def verbose(self) -> bool:
        return self.verbosity == "verbose"

    def spec(self) -> ProgressSpec:
        return ProgressSpec(self.verbosity, self.started, self.interval)

    @classmethod
    def from_spec(cls, spec: ProgressSpec | None) -> Progress:
        """A Progress in a worker process, on its stderr (a log there unless it is a terminal)."""
        if spec is None:
            return cls()
        return cls(verbosity=spec.verbosity, interval=spec.interval, started=spec.started)

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
        if self.quiet:
            return
        line = f"[ntk-ray {self.clock() - self.started:7.1f}s] {message}"
        stream = self.stream or sys.stderr
        if self.tty:
            tqdm.write(line, file=stream)  # above any live bar, which is redrawn below it
            stream.flush()
        else:
            print(line, file=stream, flush=True)

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

    def track(self, total: int | None, unit: str = "rows", name: str | None = None,
              started: float | None = None) -> Tracker:
        """A tracker of ``total`` units (None: not known; no ETA then) for the running stage
        (``name``: another label; ``started``: when the work began, by ``clock``, if not now);
        use it as a context manager and call ``update(n)`` (or ``add_rows(summary_row)``) as work
        ends."""
        return Tracker(self, name or (self._stage[0] if self._stage else "progress"), total, unit, started)

    def steps(self, name: str | None = None, unit: str = "batches") -> Steps:
        """A ``(done, total, loss)`` callback (``core.training.train_lora``'s ``on_batch``) that
        tracks the batches of a training run (its total is known at the first call)."""
        return Steps(self, name, unit)


LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%), {per_second}, ETA {remaining}{postfix}"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt}{unit}, {per_second}{postfix}"
LAST_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} in {elapsed} ({per_second}){postfix}"
LAST_FORMAT_NO_TOTAL = "{desc}: {n_fmt}{unit} in {elapsed} ({per_second}){postfix}"


def per_second(rate: float | None, unit: str) -> str:
    """``13.30 rows/s``; two significant digits below 0.1 (``0.0042 batches/s``), not ``0.00``."""
    if not rate:
        return f"?{unit}/s"
    return f"{rate:.2f}{unit}/s" if rate >= 0.1 else f"{rate:.2g}{unit}/s"


def library_env(verbosity: str) -> dict[str, str]:
    """Environment that keeps the libraries in a worker quiet about expected conditions unless
    ``verbose``: no per-actor "Loading weights" bars (transformers, huggingface_hub), no
    transformers warnings (its errors still print)."""
    if verbosity == "verbose":
        return {}
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_libraries(verbosity: str) -> None:
    """``library_env`` in this process (the in-process executor): the environment for what is
    imported later, and transformers' switches if it is imported already."""
    env = library_env(verbosity)
    for key, value in env.items():
        os.environ.setdefault(key, value)  # what the user set stays
    if env and "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            hf_logging.disable_progress_bar()
        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            hf_logging.set_verbosity_error()


class _LogLines(tqdm):
    """tqdm whose display is one log line through ``Progress.log``: at most one per
    ``mininterval`` seconds of ``clock`` (tqdm's own gate), and the last one on ``close`` (with
    the average rate), for logs that are not terminals."""

    monitor_interval = 0  # no monitor thread: lines are printed only from update() and close()

    def __init__(self, *args, log, clock, started=None, **kwargs):
        self._log = log
        self._closing = False
        super().__init__(*args, file=io.StringIO(), **kwargs)
        self._time = clock
        self.start_t = self.last_print_t = clock() if started is None else started

    def line(self) -> str:
        d = self.format_dict
        total_known = d["total"] and d["n"] < d["total"] + 0.5
        if total_known:
            fmt = LAST_FORMAT if self._closing else LOG_FORMAT
        else:
            fmt = LAST_FORMAT_NO_TOTAL if self._closing else LOG_FORMAT_NO_TOTAL
        d["bar_format"] = fmt
        rate = d["rate"] if d["rate"] is not None or not d["elapsed"] else d["n"] / d["elapsed"]
        return " ".join(self.format_meter(**d, per_second=per_second(rate, d["unit"])).split())

    def display(self, msg=None, pos=None):
        done = self.total and self.n >= self.total  # the last line (close) follows at once: say it once
        if self._closing or (self.n and not done):
            self._log(self.line())
        return True

    def close(self):
        if not self.disable:
            self._closing = True
        super().close()


class Tracker:
    """Rows (or batches) done of a stage: a live tqdm bar on a terminal, log lines elsewhere,
    nothing when quiet."""

    def __init__(self, progress: Progress, name: str, total: int | None, unit: str = "rows",
                 started: float | None = None):
        self.name, self.total, self.unit = name, None if total is None else int(total), unit
        self.n = 0
        if progress.quiet:
            self.bar = None
        elif progress.tty:
            self.bar = tqdm(total=self.total, desc=name, unit=unit, file=progress.stream or sys.stderr,
                            mininterval=0.5, dynamic_ncols=True, leave=True)
            if started is not None and progress.clock is time.time:
                self.bar.start_t = self.bar.last_print_t = started
        else:
            self.bar = _LogLines(total=self.total, desc=name, unit=" " + unit, log=progress.log, clock=progress.clock,
                                 started=started, mininterval=progress.interval, miniters=1, smoothing=0.3)

    def update(self, n: int = 1, **postfix) -> None:
        """``n`` more units done; ``postfix``: values shown after the rate (e.g. ``loss=2.31``)."""
        self.n += n
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix(refresh=False, **{k: (f"{v:.4g}" if isinstance(v, float) else v)
                                                   for k, v in postfix.items()})
        self.bar.update(n)

    def add_rows(self, summary: dict) -> None:
        """An executor's ``on_result`` hook: a finished unit's summary row carries ``rows``."""
        self.update(int(summary.get("rows") or 0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Steps:
    """``Progress.steps``: a tracker opened at the first ``(done, total, loss)`` call and closed
    (its last line) when ``done`` reaches ``total``."""

    def __init__(self, progress: Progress, name: str | None, unit: str):
        self.progress, self.name, self.unit = progress, name, unit
        self.started = progress.clock()  # the rate counts from here, not from the first batch's end
        self.tracker: Tracker | None = None

    def __call__(self, done: int, total: int, loss: float | None = None) -> None:
        if self.tracker is None:
            self.tracker = self.progress.track(total, self.unit, self.name, started=self.started)
        self.tracker.update(done - self.tracker.n, **({} if loss is None else {"loss": float(loss)}))
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
