"""Read-stage benchmark: one big file read and tokenized by 1 and 2 Ray reader actors, beside the floor.

    nice -n 10 .venv/bin/python benchmarks/bench_read.py                 # the issue's size: 1M rows
    nice -n 10 .venv/bin/python benchmarks/bench_read.py --rows 200000   # what a loaded 2-core machine allows

Synthetic rows (``{"id": "r<i>", "text": ~200 bytes of pseudo-words}``) are written once into
``--dir`` (default /tmp/ntk-bench-read; not committed) as one JSONL file and the same rows as one
Parquet file (row groups of 65,536 rows). For each file, side by side in this one run:

  floor      this process, no Ray: pyarrow reads the file (``pyarrow.json.read_json`` /
             ``pyarrow.parquet.read_table``), then the demo tokenizer (the fast tokenizer that
             ``models.load_tokenizer(None)`` loads, as ``tests/conftest.py`` ``tok`` does) encodes
             the texts in batches of ``read.CHUNK_ROWS``. Nothing is validated or written.
  stage      ``stages.read.read_files`` on a ``RayExecutor`` whose Ray has ``actors + 1`` CPUs
             (so ``actors`` reader actors: the read pool is CPUs - 1), with ``--read-unit-mb``
             parts: the pre-pass tasks, actor start-up (tokenizer load), reading, validating,
             tokenizing and writing the token shards with their markers; wall clock.

Rows/s of both, the stage's ratio to the floor per actor, and the 2-actor speed-up. Tokenizer
threads are pinned to one (``RAYON_NUM_THREADS=1``, also in the Ray workers), so the floor is
one core and an actor is one core.

Driver memory: a fresh process loads the pool's token shards the way the validate stage does
(``read_shards`` of the metadata columns, then ``account_rows``) and reports its peak RSS above
its baseline, per pool row, and the Polars ``estimated_size`` of the frames it keeps; the
largest pool a 16 GiB head can hold follows from that (stated with its assumptions).

Results: a Markdown report printed and written to ``--out`` (default
``benchmarks/results/read.md``).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers loads: one core per tokenizer
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_avg, log, machine_line, write_report

GIB = 1 << 30


def make_data(directory: Path, rows: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """pool.jsonl, pool.parquet (the same rows) and a small domain.jsonl, written once."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    jsonl, parquet, domain = directory / f"pool-{rows}.jsonl", directory / f"pool-{rows}.parquet", directory / "domain.jsonl"
    if jsonl.exists() and parquet.exists() and domain.exists():
        return jsonl, parquet, domain
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "an", "er", "is", "ot", "ul", "by", "ch", "st"]
    vocab = np.array(["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(5000)])
    log(f"writing {rows:,} rows into {directory}")
    texts = []
    for _ in range(rows):
        words = vocab[rng.integers(0, len(vocab), size=40)]
        text, size = [], 0
        for w in words:
            if size >= 200:
                break
            text.append(w)
            size += len(w) + 1
        texts.append(" ".join(text))
    ids = [f"r{i}" for i in range(rows)]
    tmp = jsonl.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i, t in zip(ids, texts):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    tmp.rename(jsonl)
    pq.write_table(pa.table({"id": ids, "text": texts}), parquet, row_group_size=65536)
    domain.write_text("".join(json.dumps({"id": f"d{i}", "text": texts[i]}) + "\n" for i in range(50)))
    return jsonl, parquet, domain


def floor(path: Path, batch: int) -> dict:
    """pyarrow read + the fast tokenizer, one process, one core."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from ntk_ray.models import load_tokenizer

    tok = load_tokenizer(None)
    start, cpu = time.perf_counter(), time.process_time()
    if path.suffix == ".parquet":
        table = pq.read_table(path, columns=["id", "text"], use_threads=False)
    else:
        table = pj.read_json(path, read_options=pj.ReadOptions(use_threads=False))
    texts = table.column("text").to_pylist()
    read_s = time.perf_counter() - start
    tokens = 0
    for i in range(0, len(texts), batch):
        tokens += sum(len(ids) for ids in tok(texts[i:i + batch], add_special_tokens=True)["input_ids"])
    return {"rows": len(texts), "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
            "read_s": read_s, "tokens": tokens}


def stage(path: Path, actors: int, work: Path, unit_mb: float) -> dict:
    """``read_files`` on a fresh Ray with ``actors`` reader actors."""
    import pyarrow.parquet as pq
    import ray

    from ntk_ray.config import SelectConfig
    from ntk_ray.io.rows import Columns
    from ntk_ray.runtime.ray_executor import RayExecutor
    from ntk_ray.stages.read import plan_units, read_files
    from ntk_ray.stages.workers import ReadSpec

    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):  # Ray gives its raylet 30 s to start: not always enough on a loaded machine
        try:
            ray.init(num_cpus=actors + 1, num_gpus=0, include_dashboard=False, log_to_driver=False,
                     object_store_memory=512 << 20)
            break
        except Exception as e:  # retried, then raised
            ray.shutdown()
            if attempt == 2:
                raise
            log(f"ray did not start ({e}); again")
    try:
        ex = RayExecutor(log=lambda *_: None)
        spec = ReadSpec("pool", "text", Columns(), None, SelectConfig.max_length, "truncate")
        target = work / f"{path.name}-{actors}"
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        units = plan_units(ex, [str(path)], max(1, int(unit_mb * (1 << 20))))
        plan_s = time.perf_counter() - t0
        start = time.perf_counter()
        read_files(ex, [str(path)], spec, target, unit_mb=unit_mb)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in target.glob("*.parquet"))
    markers = [json.loads(p.read_text()) for p in (target / "_done").glob("*.json")]
    return {"rows": rows, "seconds": seconds, "plan_s": plan_s, "units": len(units), "dir": str(target),
            "busy": sum(m["seconds"] for m in markers), "cpu": sum(m["cpu_seconds"] for m in markers)}


def memory_child(pool_dir: str, domain_dir: str, pool: str, domain: str, fraction: str) -> None:
    """(In a fresh process) the validate stage's driver work over the first ``fraction`` of the
    pool's token shards; prints RSS (held after it, and peak) against the baseline as JSON."""
    import polars as pl  # noqa: F401 (imported before the baseline: its import is not per row)

    from ntk_ray.io.accounting import account_rows
    from ntk_ray.io.shards import list_shards, read_shards, shards_frame

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    cols = ["role", "id", "key", "source", "row", "n_tokens", "truncated", "reject"]
    domain_frame = read_shards(domain_dir, cols)
    base = rss()
    shards = list_shards(pool_dir)
    frames = {"domain": domain_frame, "pool": shards_frame(shards[:max(1, round(len(shards) * float(fraction)))], cols)}
    tables = account_rows(frames, {"domain": [domain], "pool": [pool]}, 10)
    kept = tables["usable"]["pool"].estimated_size() + tables["rejects"].estimated_size()
    print(json.dumps({"rows": frames["pool"].height, "base": base, "held": rss(), "peak": peak(),
                      "frame_bytes": frames["pool"].estimated_size(), "kept_bytes": kept}))


def measure_memory(pool_dir: str, domain_dir: str, pool: Path, domain: Path, fraction: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", pool_dir, domain_dir, str(pool), str(domain),
                          str(fraction)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ntk-bench-read"))
    ap.add_argument("--actors", default="1,2", help="reader actor counts to run (comma-separated)")
    ap.add_argument("--unit-mb", type=float, default=None,
                    help="--read-unit-mb of the stage (default: 64, or less so the file makes >= 8 units)")
    ap.add_argument("--formats", default="jsonl,parquet")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "read.md")
    ap.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return 0

    from ntk_ray.config import SelectConfig
    from ntk_ray.stages.read import CHUNK_ROWS

    jsonl, parquet, domain = make_data(args.dir, args.rows)
    size_mb = jsonl.stat().st_size / (1 << 20)
    unit_mb = args.unit_mb or min(SelectConfig.read_unit_mb, size_mb / 8)
    actor_counts = [int(a) for a in args.actors.split(",")]
    work = args.dir / "work"
    results = []
    for fmt in args.formats.split(","):
        path = jsonl if fmt == "jsonl" else parquet
        log(f"{fmt}: floor")
        f = floor(path, CHUNK_ROWS)
        f["load"] = load_avg()
        log(f"{fmt}: floor {f['rows'] / f['seconds']:,.0f} rows/s")
        runs = []
        for actors in actor_counts:
            log(f"{fmt}: read stage, {actors} actor(s)")
            s = stage(path, actors, work, unit_mb)
            s["load"] = load_avg()
            if s["rows"] != args.rows:
                raise SystemExit(f"{fmt}: the stage wrote {s['rows']} rows, not {args.rows}")
            log(f"{fmt}: {actors} actor(s) {s['rows'] / s['seconds']:,.0f} rows/s ({s['units']} units)")
            runs.append((actors, s))
        results.append((fmt, path, f, runs))

    # driver memory of the validate stage, on the JSONL pool's shards
    from ntk_ray.io.rows import Columns
    from ntk_ray.runtime.local import LocalExecutor
    from ntk_ray.stages.read import read_files
    from ntk_ray.stages.workers import ReadSpec

    domain_dir = work / "domain"
    shutil.rmtree(domain_dir, ignore_errors=True)
    read_files(LocalExecutor(), [str(domain)], ReadSpec("domain", "text", Columns(), None, SelectConfig.max_length,
                                                        "truncate"), domain_dir)
    pool_dir = next(s["dir"] for fmt, _, _, runs in results for _, s in runs)
    half = measure_memory(pool_dir, str(domain_dir), jsonl, domain, 0.5)
    mem = measure_memory(pool_dir, str(domain_dir), jsonl, domain, 1.0)
    extra = mem["rows"] - half["rows"]
    held_per_row = (mem["held"] - half["held"]) / extra  # the slope: fixed costs (allocator pools) cancel
    peak_per_row = (mem["peak"] - half["peak"]) / extra
    per_row = max(held_per_row, peak_per_row, 1)
    kept_per_row = mem["kept_bytes"] / mem["rows"]

    lines = [
        "# Read stage: one big file, 1 and 2 reader actors, beside the floor",
        "",
        (f"Machine: {machine_line(thread_note=', tokenizer threads pinned to 1')}; shared with other sessions "
        f"(the `load` column: 1-minute load average when the row finished). Rows: {args.rows:,} synthetic rows "
        f"(~200 bytes of text each), one JSONL file of {size_mb:,.0f} MiB and the same rows as one Parquet file "
        f"(row groups of 65,536 rows); `--read-unit-mb {unit_mb:g}`; token shards of {CHUNK_ROWS} rows. "
        "Wall rows/s of the stage include the pre-pass and the actors' start-up (tokenizer load); busy rows/s per "
        "actor are rows over the summed wall time of the units (as the unit markers record it), CPU rows/s over "
        "their summed CPU time: the load of other sessions hits wall times, not CPU times."),
        "",
        ("| file | what | rows/s (wall) | x floor | x 1 actor | busy rows/s per actor | x floor | "
        "CPU rows/s per actor | x floor CPU | units | pre-pass s | load |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, path, f, runs in results:
        fr, fc = f["rows"] / f["seconds"], f["rows"] / f["cpu"]
        lines.append(f"| {fmt} | floor: pyarrow read + fast tokenizer, 1 process | {fr:,.0f} | 1.00 | | {fr:,.0f} | "
                     f"1.00 | {fc:,.0f} | 1.00 | | | {f['load']:.1f} |")
        one = None
        for actors, s in runs:
            r = s["rows"] / s["seconds"]
            busy = s["rows"] / s["busy"] if s["busy"] else float("nan")  # per actor: rows over summed unit time
            cpu = s["rows"] / s["cpu"] if s["cpu"] else float("nan")
            one = one or (r if actors == 1 else None)
            speedup = f"{r / one:.2f}" if one else ""
            lines.append(f"| {fmt} | read stage, {actors} actor{'s' if actors > 1 else ''} | {r:,.0f} | {r / fr:.2f} | "
                         f"{speedup} | {busy:,.0f} | {busy / fr:.2f} | {cpu:,.0f} | {cpu / fc:.2f} | {s['units']} | "
                         f"{s['plan_s']:.1f} | {s['load']:.1f} |")
    head_gib = 16
    overhead = 3 * GIB  # Ray head processes, the driver's imports, the object store's floor (assumed)
    largest = (head_gib * GIB - overhead) / per_row
    lines += [
        "",
        (f"Driver memory (validate stage: `read_shards` + `account_rows` in a fresh process, over half and over all "
        f"of the {mem['rows']:,} pool rows' token shards; the difference divided by the extra rows, so fixed costs "
        f"cancel): RSS held afterwards {held_per_row:,.0f} bytes per row, peak RSS {peak_per_row:,.0f} bytes per "
        f"row, so **{per_row:,.0f} bytes per pool row** (all rows: peak {(mem['peak'] - mem['base']) / (1 << 20):,.0f}"
        f" MiB above the baseline; the metadata frame's Polars `estimated_size` {mem['frame_bytes'] / mem['rows']:,.0f}"
        f" bytes/row, what the later stages keep, usable rows and rejects, {kept_per_row:,.0f} bytes/row). "
        f"A {head_gib} GiB head, less ~3 GiB for Ray's head processes and the driver's imports (assumed, not "
        f"measured here), holds about **{largest / 1e6:,.0f}M pool rows** through the read and validate stages."),
        "",
        (f"Regenerate: `nice -n 10 .venv/bin/python benchmarks/bench_read.py --rows {args.rows}` "
        "(the issue's size: `--rows 1000000`, the default)."),
    ]
    write_report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
