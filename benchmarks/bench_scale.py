"""Scale benchmark of the Ray-sharded kernel stages at 100K and 1M pool rows, on CPU.

    .venv/bin/python benchmarks/bench_scale.py                 # 100K and 1M, writes the table
    .venv/bin/python benchmarks/bench_scale.py --rows 20000    # a quick look, no table
    .venv/bin/python benchmarks/bench_scale.py --rows 2000 4000 --anchors 8 --k 10 --emb-dim 16 \
        --shard-rows 1000 --results /tmp/scale.md --max-ratio 100   # the CI smoke size

Random vectors stand in for the model's outputs and go through the same code as the job:

  coarse  unit embeddings (dim 576, SmolLM2-135M's hidden size) in Parquet shards ->
          ``stages.kernel.merge_topk`` on a ``RayExecutor`` (per-anchor top-K, K = the budget,
          against 1000 domain anchors) -> ``coarse.votes`` -> ``coarse.coarse_order`` over every
          pool key, as in ``stages.rank.CoarseStage``.
  score   NTK features (d = 256 here; the job's default 8192 would be 32 GB of features at 1M
          rows) in Parquet shards with a ``reject`` column -> ``stages.kernel.score_shards``
          against 1000 anchor features -> the (key, score, reject) frame, as in
          ``stages.rank.kernel_scores``.
          Every pool row is scored (as if M = N: the worst case; the job scores only
          coarse-factor x budget rows).

Shards are written by Ray tasks with pyarrow (fixed_size_list<float32> columns, like the
pipeline's Ray Data writes), each size into a fresh directory, removed afterwards. Each size
runs in a fresh embedded Ray (``--cpus``, no GPU, capped object store). While a stage runs, a
background thread samples, every 0.2 s, the memory of the driver and all its descendants (every
Ray process of the embedded cluster: GCS, raylet, dashboard agent, workers) with psutil: PSS
(shared pages such as the object store counted once, split between the processes mapping them)
and RSS (shared pages counted in every process). The check: peak PSS at the largest size is
within ``--max-ratio`` (1.5) of peak PSS at the smallest. Prints PASS/FAIL; exit status 1 on FAIL.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

MiB = 2**20


class MemorySampler:
    """Peak summed PSS / RSS of this process and all its descendants, sampled in a thread, and
    the CPU seconds they used meanwhile (robust to other load on a shared machine)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.me = psutil.Process()
        self.peak_pss = self.peak_rss = 0
        self.peak_procs = 0
        self.cpu_start: dict = {}
        self.cpu_last: dict = {}
        self.load = []
        self._stop = threading.Event()
        self._thread = None

    def sample(self) -> tuple[int, int, int]:
        pss = rss = n = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                with p.oneshot():
                    info = p.memory_full_info()
                    cpu = p.cpu_times()
                    ident = (p.pid, p.create_time())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
            n += 1
            self.cpu_last[ident] = cpu.user + cpu.system
        return pss, rss, n

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self.cpu_start.get(k, 0.0) for k, v in self.cpu_last.items())

    def _run(self):
        while not self._stop.is_set():
            pss, rss, n = self.sample()
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, n)
            self.load.append(os.getloadavg()[0])
            self._stop.wait(self.interval)

    def __enter__(self):
        self.sample()
        self.cpu_start = dict(self.cpu_last)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        pss, rss, n = self.sample()
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)


# -------------------------------------------------------------------------------------------
# synthetic shards (written by Ray tasks)
def _write_shard(path: str, kind: str, start: int, rows: int, dim: int, seed: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, start])
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    if kind == "embedding":  # the Embedder writes L2-normalised mean-pooled states
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = np.arange(start, start + rows, dtype=np.int64) * 2654435761 % (2**61 - 1)  # distinct, unordered
    cols = {"key": keys, kind: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}
    if kind == "feature":
        cols["reject"] = pa.nulls(rows, pa.string())
    pq.write_table(pa.table(cols), path)
    return rows


def write_shards(directory: Path, kind: str, rows: int, shard_rows: int, dim: int, seed: int) -> list[str]:
    import ray

    directory.mkdir(parents=True)
    task = ray.remote(_write_shard)
    paths, refs = [], []
    for i, start in enumerate(range(0, rows, shard_rows)):
        path = str(directory / f"part-{i:05d}.parquet")
        paths.append(path)
        refs.append(task.remote(path, kind, start, min(shard_rows, rows - start), dim, seed))
        if len(refs) >= 4:
            done, refs = ray.wait(refs, num_returns=1)
            ray.get(done)
    ray.get(refs)
    return paths


# -------------------------------------------------------------------------------------------
def run_size(rows: int, args) -> dict:
    import polars as pl
    import ray

    from ntk_ray.core.coarse import coarse_order, votes
    from ntk_ray.runtime.ray_executor import RayExecutor
    from ntk_ray.stages.kernel import merge_topk, score_shards

    data = Path(args.data_dir) / f"n{rows}"
    shutil.rmtree(data, ignore_errors=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.cpus, num_gpus=0, include_dashboard=False, object_store_memory=args.object_store_mib * MiB,
             log_to_driver=False)
    result = {"rows": rows}
    try:
        executor = RayExecutor(log=lambda *_: None)  # joins the Ray started above, as the job's stages run on it
        rng = np.random.default_rng(args.seed)
        t = time.time()
        emb_files = write_shards(data / "embed", "embedding", rows, args.shard_rows, args.emb_dim, args.seed)
        feat_files = write_shards(data / "features", "feature", rows, args.shard_rows, args.feat_dim, args.seed + 1)
        result["write_s"] = time.time() - t
        result["shards"] = len(emb_files)
        result["disk_mib"] = sum(os.path.getsize(p) for p in emb_files + feat_files) / MiB
        time.sleep(1.0)
        result["idle_pss_mib"] = MemorySampler().sample()[0] / MiB

        anchors = rng.standard_normal((args.anchors, args.emb_dim), dtype=np.float32)
        anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
        k = min(args.k, rows)
        with MemorySampler() as mem:
            t = time.time()
            topk = merge_topk(executor, emb_files, executor.put(anchors), k, "embedding", n_anchors=args.anchors)
            table = votes(topk)
            pool = pl.DataFrame({"key": np.arange(rows, dtype=np.int64) * 2654435761 % (2**61 - 1)})
            ordered = coarse_order(pool, table)
            candidates = ordered.head(4 * k)
            result["coarse_s"] = time.time() - t
        assert ordered.height == rows and candidates.height == min(rows, 4 * k)
        assert topk.keys.shape == (args.anchors, k)
        result["coarse_pss"], result["coarse_rss"] = mem.peak_pss / MiB, mem.peak_rss / MiB
        result["coarse_cpu"], result["coarse_load"] = mem.cpu_seconds, float(np.mean(mem.load or [0]))
        del topk, table, pool, ordered, candidates

        feat_anchors = rng.standard_normal((args.anchors, args.feat_dim), dtype=np.float32)
        with MemorySampler() as mem:
            t = time.time()
            scores = score_shards(executor, feat_files, executor.put(feat_anchors), args.scorer)
            result["score_s"] = time.time() - t
        assert scores.height == rows and scores["reject"].null_count() == rows
        result["score_pss"], result["score_rss"] = mem.peak_pss / MiB, mem.peak_rss / MiB
        result["score_cpu"], result["score_load"] = mem.cpu_seconds, float(np.mean(mem.load or [0]))
        result["procs"] = mem.peak_procs
        del scores
    finally:
        ray.shutdown()
        shutil.rmtree(data, ignore_errors=True)
    result["peak_pss"] = max(result.get("coarse_pss", 0), result.get("score_pss", 0))
    result["peak_rss"] = max(result.get("coarse_rss", 0), result.get("score_rss", 0))
    return result


def table(results: list[dict], args, verdict: str) -> str:
    lines = [
        "# Scale benchmark on CPU (`benchmarks/bench_scale.py`)",
        "",
        f"Machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU, shared with other "
        f"work (timings are noisy); {platform.python_version()}, ray {_version('ray')}, numpy {np.__version__}. "
        f"Embedded Ray: {args.cpus} CPUs, object store {args.object_store_mib} MiB.",
        "",
        f"- coarse: {args.anchors} anchors x dim {args.emb_dim} unit embeddings, per-anchor top-K with "
        f"K = {args.k} (`stages.kernel.merge_topk` on a `RayExecutor`), then `votes` + `coarse_order` over every pool key.",
        f"- score: `stages.kernel.score_shards`, scorer `{args.scorer}`, {args.anchors} anchor features x d = {args.feat_dim} "
        f"(not the default 8192: 1M x 8192 float32 = 32 GB of features), every row scored.",
        f"- shards of {args.shard_rows} rows, snappy Parquet, written by Ray tasks (time not included below).",
        "- memory: peak over the stage of the summed PSS (and RSS) of the driver and every Ray process "
        "(0.2 s samples); idle = the same sum with Ray up and nothing running.",
        "- rows/s is wall time; rows/CPU-s divides by the CPU seconds the driver and the Ray processes used "
        "in the stage (it does not depend on other load); load = mean 1-minute load average during the stage.",
        "",
        "| rows | shards | coarse s | coarse rows/s | coarse rows/CPU-s | score s | score rows/s | score rows/CPU-s "
        "| load | idle PSS MiB | coarse peak PSS MiB | score peak PSS MiB | peak PSS MiB | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['shards']} | {r['coarse_s']:.1f} | {r['rows'] / r['coarse_s']:,.0f} "
                     f"| {r['rows'] / r['coarse_cpu']:,.0f} | {r['score_s']:.1f} | {r['rows'] / r['score_s']:,.0f} "
                     f"| {r['rows'] / r['score_cpu']:,.0f} | {max(r['coarse_load'], r['score_load']):.1f} "
                     f"| {r['idle_pss_mib']:,.0f} | {r['coarse_pss']:,.0f} | {r['score_pss']:,.0f} | {r['peak_pss']:,.0f} "
                     f"| {r['peak_rss']:,.0f} |")
    lines += ["", verdict, ""]
    return "\n".join(lines)


def _version(name: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--anchors", type=int, default=1000, help="domain anchors (default 1000)")
    p.add_argument("--emb-dim", type=int, default=576)
    p.add_argument("--k", type=int, default=9000, help="coarse K per anchor (default 9000, the budget)")
    p.add_argument("--feat-dim", type=int, default=256)
    p.add_argument("--scorer", default="max", choices=["mean", "cosine", "max", "round-robin"],
                   help="default max: it forms (rows x anchors) kernel blocks, the heaviest per-row scorer")
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--object-store-mib", type=int, default=1024)
    p.add_argument("--max-ratio", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=f"/tmp/ntkr-bench-{os.getpid()}")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results/scale_cpu.md"),
                   help="markdown table written when two or more sizes ran ('' to skip)")
    args = p.parse_args(argv)

    results = []
    try:
        for rows in sorted(args.rows):
            r = run_size(rows, args)
            results.append(r)
            print(f"{rows:>9,} rows: write {r['write_s']:.1f}s ({r['shards']} shards, {r['disk_mib']:,.0f} MiB) | "
                  f"coarse {r['coarse_s']:.1f}s = {rows / r['coarse_s']:,.0f} rows/s ({rows / r['coarse_cpu']:,.0f}/CPU-s), "
                  f"peak PSS {r['coarse_pss']:,.0f} MiB | score {r['score_s']:.1f}s = {rows / r['score_s']:,.0f} rows/s "
                  f"({rows / r['score_cpu']:,.0f}/CPU-s), peak PSS {r['score_pss']:,.0f} MiB | "
                  f"load {r['coarse_load']:.1f}/{r['score_load']:.1f} | "
                  f"idle PSS {r['idle_pss_mib']:,.0f} MiB, peak RSS {r['peak_rss']:,.0f} MiB", flush=True)
    finally:
        shutil.rmtree(args.data_dir, ignore_errors=True)
    if len(results) < 2:
        return 0
    ratio = results[-1]["peak_pss"] / results[0]["peak_pss"]
    ok = ratio <= args.max_ratio
    verdict = (f"**{'PASS' if ok else 'FAIL'}**: peak PSS at {results[-1]['rows']:,} rows / at {results[0]['rows']:,} rows "
               f"= {results[-1]['peak_pss']:,.0f} / {results[0]['peak_pss']:,.0f} MiB = {ratio:.2f} (limit {args.max_ratio}).")
    print(verdict.replace("**", ""))
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(table(results, args, verdict))
        print(f"table written to {args.results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
