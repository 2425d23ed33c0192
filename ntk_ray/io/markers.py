"""Completion markers: the one resume mechanism, for whole stages and for the units inside one.

A stage that finished leaves ``<stage dir>/_SUCCESS``; a unit of work inside a stage (an input
file read, a token shard embedded or featurised) leaves ``<stage dir>/_done/<unit>.json``. Each
marker is a small JSON document written atomically and durably (``io.atomic``) *after* the data
it vouches for, so a marker that exists means its data is whole. A marker that cannot be read
(truncated by a crash on a file system without atomic rename, edited by hand) means "not done":
the work is redone, never trusted. An empty marker file is such a truncated one (a marker
always holds at least ``{}``).

The stage directory may be an object-store URI (``io.location``): the marker is then one
object, written whole after its data's objects.
"""

from __future__ import annotations

import json
from pathlib import Path

from ntk_ray.io.atomic import write_json_atomic
from ntk_ray.io.location import location

STAGE_MARKER = "_SUCCESS"
UNITS_DIR = "_done"


def _path(directory, unit: str | None):
    return location(directory) / STAGE_MARKER if unit is None else location(directory) / UNITS_DIR / f"{unit}.json"


def read_marker(directory: str | Path, unit: str | None = None) -> dict | None:
    """The marker's info, or None when there is none or it cannot be read."""
    try:
        info = json.loads(_path(directory, unit).read_text())  # empty: truncated, not done
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_done(directory: str | Path, unit: str | None = None) -> bool:
    return read_marker(directory, unit) is not None


def mark_done(directory: str | Path, unit: str | None = None, info: dict | None = None) -> None:
    path = _path(directory, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(info or {}, path)
