"""Helpers shared by the benchmark scripts (`bench_features.py`, `paper_checks.py`).

Not a package: each script puts its own directory on ``sys.path`` and imports ``_common``.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch


def load_avg() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def log(msg: str) -> None:
    """A timestamped progress line on stderr, with the load average."""
    print(f"[{time.strftime('%H:%M:%S')} load {load_avg():.1f}] {msg}", file=sys.stderr, flush=True)


def write_report(text: str, path) -> None:
    """Print a Markdown report and write it to ``path`` (parents created; None: print only)."""
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log(f"wrote {path}")


def machine_line(device: torch.device | str | None = None, *, cpu: str | None = None, cores: int | None = None,
                 thread_note: str = "", singular: bool = False, python: bool = False) -> str:
    """The "machine" fact of a report's header.

    On a CUDA ``device``: the GPU, torch and CUDA versions. Otherwise the CPU
    (``cpu``, default ``platform.processor() or platform.machine()``), ``cores`` (default
    ``os.cpu_count()``), the torch version and its thread count, ``thread_note`` appended inside
    the parentheses; ``singular`` writes "1 thread" rather than "1 threads"; ``python`` appends
    the Python version.
    """
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (1 GPU), torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = (platform.processor() or platform.machine()) if cpu is None else cpu
    cores = os.cpu_count() if cores is None else cores
    threads = torch.get_num_threads()
    word = "thread" if singular and threads == 1 else "threads"
    line = f"{cpu}, {cores} cores, torch {torch.__version__} ({threads} {word}{thread_note})"
    if python:
        line += f", Python {platform.python_version()}"
    return line
