"""The Python API: ``ntk_ray.select(domain=..., pool=..., budget=..., **options)``.

    import ntk_ray
    result = ntk_ray.select(domain="med.jsonl", pool="pool/*.parquet", budget=9000, out="runs/med")
    result.selected      # Polars frame: the chosen rows with all their columns, rank and score
    result.ranked        # every usable pool row, ranked
    result.manifest      # counts, config, stage times, ...

It runs exactly what ``ntk-ray select`` runs (``runner.run_select``): same stages, same
outputs in ``out``, same resume. ``domain`` and ``pool`` may be paths (a file, a directory, a
glob, a list of them) or in-memory tables: a Polars or pandas frame, a pyarrow Table, or a
Hugging Face ``datasets.Dataset``. A table is written once to a Parquet file named by its
content under ``~/.cache/ntk-ray/inputs`` (``NTK_RAY_CACHE``), so rerunning the same call
resumes instead of starting over. ``executor="local"`` runs every stage in this process
without Ray (small data, notebooks, tests); the default starts or joins Ray as the CLI does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl


@dataclass
class Selection:
    """What ``select`` returns: the result files of ``out``, loaded."""
    out: Path
    ranked: pl.DataFrame
    selected: pl.DataFrame
    rejects: pl.DataFrame
    manifest: dict


def _as_arrow(data):
    """An in-memory table as a pyarrow Table, or None when ``data`` is a path (or paths)."""
    import pyarrow as pa

    if isinstance(data, (str, Path)) or (isinstance(data, (list, tuple)) and all(isinstance(d, (str, Path)) for d in data)):
        return None
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pl.DataFrame):
        return data.to_arrow()
    if hasattr(data, "with_format") and hasattr(data, "data"):  # datasets.Dataset: its Arrow table
        table = data.data.table if hasattr(data.data, "table") else data.data
        if getattr(data, "_indices", None) is not None:  # a shuffled/selected view: materialise it
            table = data.flatten_indices().data.table
        return table
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas
        return pa.Table.from_pandas(data, preserve_index=False)
    raise TypeError(f"cannot use a {type(data).__name__} as data: pass a path, a Polars/pandas frame, a pyarrow "
                    "Table or a datasets.Dataset")


def _materialise(data, role: str) -> list[str]:
    """Paths for ``data``: the paths themselves, or a content-named Parquet copy of a table."""
    import pyarrow.parquet as pq

    from ntk_ray.io.atomic import write_atomic
    from ntk_ray.models import cache_root

    table = _as_arrow(data)
    if table is None:
        return [str(p) for p in data] if isinstance(data, (list, tuple)) else [str(data)]
    sink = _ipc_digest(table)
    target = cache_root() / "inputs" / f"{role}-{sink}.parquet"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda f: pq.write_table(table, f, compression="zstd"))
    return [str(target)]


def _ipc_digest(table) -> str:
    import pyarrow as pa

    h = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    h.update(sink.getvalue())
    return h.hexdigest()[:16]


def select(domain, pool, budget: int, out: str | Path | None = None, *, executor="ray", overwrite: bool = False,
           **options) -> Selection:
    """Select ``budget`` rows of ``pool`` for the domain of ``domain``; see the module docstring.
    ``options`` are ``SelectConfig`` fields (the long flags of ``ntk-ray select`` with ``_``
    for ``-``: ``model``, ``selector``, ``scorer``, ``proj_dim``, ``seed``, ...). ``out``
    defaults to a new temporary directory. ``executor``: "ray" (default), "local", or an
    executor object (``runtime.local.LocalExecutor``, ``runtime.ray_executor.RayExecutor``)."""
    from ntk_ray.config import SelectConfig
    from ntk_ray.runner import run_select

    fields = {f.name for f in dataclasses.fields(SelectConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; SelectConfig has {', '.join(sorted(fields))}")
    out = Path(out).expanduser() if out is not None else Path(tempfile.mkdtemp(prefix="ntk-ray-"))
    cfg = SelectConfig(domain=_materialise(domain, "domain"), pool=_materialise(pool, "pool"), budget=int(budget),
                       out=str(out), **options)
    if executor == "local":
        from ntk_ray.runtime.local import LocalExecutor

        executor = LocalExecutor()
    manifest = run_select(cfg, overwrite=overwrite, executor=None if executor == "ray" else executor)
    return Selection(out=out, ranked=pl.read_parquet(out / "ranked.parquet"), selected=pl.read_parquet(out / "selected.parquet"),
                     rejects=pl.read_parquet(out / "rejects.parquet"), manifest=manifest)
