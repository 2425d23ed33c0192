"""How long the selection report takes, and how much memory, on a 1M-row output directory.

    .venv/bin/python benchmarks/bench_report.py [--rows 1000000] [--budget 10000] [--dir /tmp/ntk-ray-bench-report]

Generates (once; reused while its ``_bench.json`` matches the sizes) a synthetic finished
``select`` output directory the size of a 1M-row run: 8 Parquet pool files with ``id`` and
``text`` (15-40 words of a 5,000-word vocabulary), ``ranked.parquet`` (every usable row;
M = 4 x budget ntk rows with scores, the rest coarse), ``selected.parquet`` (the budget's rows
with their text, 2% of them planted near-duplicates), ``rejects.parquet`` (1% of the pool),
``manifest.json``, and the token shards ``_work/tokens/{pool,domain}`` in the real schema
(100 shards of 10,000 rows with their ``input_ids``, which the report must not read).

Then builds the report in a fresh process (``ntk_ray.report.build_report``) and reports its
wall seconds, CPU seconds and peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that
process, imports included; the RSS after the imports alone is reported too). Writes
``benchmarks/results/report.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
N_FILES, SHARD_ROWS, VOCAB = 8, 10_000, 5_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def make_output(out: Path, rows: int, budget: int, seed: int = 0) -> None:
    """The synthetic output directory (see the module doc)."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    data = out / "data"
    for d in (data, out / "_work/tokens/pool", out / "_work/tokens/domain"):
        d.mkdir(parents=True, exist_ok=True)
    vocab = pl.Series([f"w{i}" for i in range(VOCAB)])
    lengths = rng.integers(15, 41, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    words = vocab.gather(rng.integers(0, VOCAB, int(offsets[-1])))
    texts = (pl.DataFrame({"w": words, "r": np.repeat(np.arange(rows), lengths)})
             .group_by("r", maintain_order=True).agg(pl.col("w").str.join(" "))["w"])
    ids = pl.Series([f"pool-{i:07d}" for i in range(rows)])
    per_file = rows // N_FILES
    file_of = np.minimum(np.arange(rows) // per_file, N_FILES - 1)
    row_in_file = np.arange(rows) - file_of * per_file
    sources = [str(data / f"pool-{f}.parquet") for f in range(N_FILES)]
    for f in range(N_FILES):
        sel = file_of == f
        pq.write_table(pa.table({"id": ids.filter(sel).to_arrow(), "text": texts.filter(sel).to_arrow()}),
                       sources[f], row_group_size=50_000)
    log(f"pool files: {rows:,} rows in {N_FILES} files")
    n_tokens = (lengths * 1.3).astype(np.int64)
    rejected = rng.random(rows) < 0.01
    usable = np.flatnonzero(~rejected)
    order = usable[rng.permutation(usable.size)]  # rank order
    m = min(4 * budget, order.size)
    scores = np.sort(rng.normal(0.2, 0.05, m))[::-1]
    # planted near-duplicates: 2% of the selected rows copy an earlier selected row's text
    texts_np = texts.to_numpy().copy()
    dupes = rng.choice(np.arange(budget // 2, budget), budget // 50, replace=False)
    for i in dupes:
        texts_np[order[i]] = texts_np[order[int(rng.integers(0, budget // 2))]].upper() + "!"
    ranked = pl.DataFrame({
        "id": ids.gather(order), "rank": np.arange(1, order.size + 1, dtype=np.int64),
        "stage": np.where(np.arange(order.size) < m, "ntk", "coarse"),
        "score": np.concatenate([scores, np.full(order.size - m, np.nan)]),
        "coarse_votes": rng.integers(0, 10, order.size), "coarse_sim": rng.random(order.size),
        "selected": np.arange(order.size) < budget,
        "source": pl.Series(sources).gather(file_of[order]), "row": row_in_file[order]})
    ranked = ranked.with_columns(pl.col("score").fill_nan(None))
    ranked.write_parquet(out / "ranked.parquet")
    top = order[:budget]
    pl.DataFrame({"id": ids.gather(top), "text": texts_np[top], "rank": np.arange(1, budget + 1, dtype=np.int64),
                  "score": scores[:budget]}).write_parquet(out / "selected.parquet")
    bad = np.flatnonzero(rejected)
    pl.DataFrame({"id": ids.gather(bad), "source": pl.Series(sources).gather(file_of[bad]), "row": row_in_file[bad],
                  "role": ["pool"] * bad.size,
                  "reason": np.where(rng.random(bad.size) < 0.5, "empty text", "duplicate id (first at x:1)")}
                 ).write_parquet(out / "rejects.parquet")
    log("ranked, selected, rejects written")
    schema = pa.schema([("role", pa.string()), ("id", pa.string()), ("key", pa.int64()), ("source", pa.string()),
                        ("row", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("n_tokens", pa.int64()),
                        ("truncated", pa.bool_()), ("reject", pa.string())])
    for s, start in enumerate(range(0, rows, SHARD_ROWS)):
        stop = min(rows, start + SHARD_ROWS)
        n = n_tokens[start:stop]
        flat = rng.integers(0, 32_000, int(n.sum()), dtype=np.int32)
        input_ids = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(n)]).astype(np.int32)), flat)
        pq.write_table(pa.table({
            "role": ["pool"] * (stop - start), "id": ids.slice(start, stop - start).to_arrow(),
            "key": np.arange(start, stop), "source": [sources[f] for f in file_of[start:stop]],
            "row": row_in_file[start:stop], "input_ids": input_ids, "n_tokens": n,
            "truncated": np.zeros(stop - start, bool),
            "reject": pa.array([("empty text" if r else None) for r in rejected[start:stop]], pa.string())},
            schema=schema), out / f"_work/tokens/pool/{s:05d}.parquet")
    domain = 1000
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(domain)], "row": np.arange(domain),
                             "n_tokens": rng.integers(20, 60, domain), "reject": pa.nulls(domain, pa.string())}),
                   out / "_work/tokens/domain/00000.parquet")
    log(f"token shards: {rows // SHARD_ROWS} x {SHARD_ROWS:,} rows with input_ids")
    counts = {"pool_rows": rows, "domain_rows": domain, "rejected": int(bad.size), "ranked": int(order.size),
              "selected": budget, "domain_rejected": 0, "pool_usable": int(order.size), "domain_usable": domain,
              "pool_truncated": 0, "domain_truncated": 0}
    manifest = {"counts": counts, "selector": "ntk", "coarse": {"skipped": False, "M": m, "K": budget},
                "config": {"budget": budget, "text_column": "text", "warmup_epochs": 2.0},
                "model": {"resolved": "synthetic"}, "adapter": {"warmup": {"seconds": 600.0, "steps": 100}},
                "stage_seconds": {"read": 300.0, "validate": 20.0, "warmup": 600.0, "embed": 3000.0, "coarse": 175.0,
                                  "features": 1200.0, "score": 20.0, "write": 30.0, "setup": 15.0}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "_bench.json").write_text(json.dumps({"rows": rows, "budget": budget, "seed": seed}))


def build(out: Path) -> None:
    """In a fresh process: build the report, print one JSON line of its costs."""
    t0, c0 = time.time(), time.process_time()
    import matplotlib.pyplot  # noqa: F401 (the report's imports, counted apart from the build)

    from ntk_ray.report import build_report

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hwm_imports = vm_hwm_mb()
    t1, c1 = time.time(), time.process_time()
    rep = build_report(out)
    print(json.dumps({"import_seconds": t1 - t0, "build_seconds": time.time() - t1,
                      "build_cpu_seconds": time.process_time() - c1, "import_cpu_seconds": c1 - c0,
                      "rss_after_imports_mb": rss_imports, "hwm_after_imports_mb": hwm_imports,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_hwm_mb": vm_hwm_mb(),
                      "key_lines": rep.key_lines, "near_dup_share": rep.data["duplicates"]["share"]}))


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM of /proc/self/status), MiB; NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="pool rows (default: %(default)s)")
    ap.add_argument("--budget", type=int, default=10_000, help="selected rows (default: %(default)s)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ntk-ray-bench-report"),
                    help="where the synthetic output directory is made (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="report builds, each in a fresh process (default: %(default)s)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/report.md",
                    help="the Markdown results file (default: %(default)s)")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        return build(args.dir)
    if args.make_only:
        return make_output(args.dir, args.rows, args.budget)
    stamp = {"rows": args.rows, "budget": args.budget, "seed": 0}
    marker = args.dir / "_bench.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        # in a child process, so this one stays small: Linux hands a parent's peak RSS down to
        # the children it forks (getrusage's ru_maxrss of a build would report the generator's)
        t = time.time()
        subprocess.run([sys.executable, __file__, "--make-only", "--dir", str(args.dir), "--rows", str(args.rows),
                        "--budget", str(args.budget)], check=True)
        log(f"made {args.dir} in {time.time() - t:.0f}s")
    runs = []
    for _ in range(args.repeats):
        res = subprocess.run([sys.executable, __file__, "--build-only", "--dir", str(args.dir)], capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]) | {"load": os.getloadavg()[0]})
        log(f"build {runs[-1]['build_seconds']:.1f}s, peak RSS {runs[-1]['peak_rss_mb']:.0f} MiB")
    sizes = {"ranked.parquet": (args.dir / "ranked.parquet").stat().st_size / 2**20,
             "selected.parquet": (args.dir / "selected.parquet").stat().st_size / 2**20,
             "_work/tokens": du(args.dir / "_work/tokens"), "pool files": du(args.dir / "data")}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    import polars as pl

    lines = [
        "# Report benchmark (`benchmarks/bench_report.py`)", "",
        (f"> Measured at {commit} ({time.strftime('%Y-%m-%d')}). Command: `nice -n 10 .venv/bin/python "
        f"benchmarks/bench_report.py --rows {args.rows} --budget {args.budget}`."), "",
        (f"Machine: {os.cpu_count()} cores, shared with other work (wall times move with the load column; CPU "
        f"seconds less so); Python {platform.python_version()}, polars {pl.__version__}."), "",
        (f"Synthetic finished output of a {args.rows:,}-row pool, budget {args.budget:,}: ranked.parquet "
        f"{sizes['ranked.parquet']:.0f} MiB, selected.parquet {sizes['selected.parquet']:.1f} MiB, token shards "
        f"{sizes['_work/tokens']:.0f} MiB (with input_ids, which the report does not read), pool files "
        f"{sizes['pool files']:.0f} MiB (three rows read back for the examples below the cut)."), "",
        ("Each build runs in a fresh process started by a small parent; peak RSS is that process's "
         "`resource.getrusage(RUSAGE_SELF).ru_maxrss` and, as a check, its VmHWM from /proc/self/status (imports "
         "of polars, numpy, matplotlib and ntk_ray.report included; the value after the imports alone is given "
         "too)."), "",
        ("| run | peak RSS after imports MiB | peak RSS MiB (ru_maxrss) | peak RSS MiB (VmHWM) | build s (wall) "
         "| build CPU s | imports s | load |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['rss_after_imports_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_hwm_mb']:.0f} | "
                     f"{r['build_seconds']:.1f} | {r['build_cpu_seconds']:.1f} | {r['import_seconds']:.1f} | "
                     f"{r['load']:.1f} |")
    lines += ["", "The report's key lines on this output:", ""] + [f"- {k}" for k in runs[-1]["key_lines"]]
    lines += ["", (f"Near-duplicate share found: {100 * runs[-1]['near_dup_share']:.1f}% "
              f"(planted: {100 * (args.budget // 50) / args.budget:.1f}%)."), ""]
    text = "\n".join(lines)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
