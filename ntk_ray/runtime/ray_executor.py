"""The Ray executor: the only module that imports Ray.

* ``connect``: join a cluster (``--ray-address`` or RAY_ADDRESS, as inside ``ray job submit``
  and KubeRay RayJobs) or start an embedded local Ray sized to this machine.
* ``RayExecutor.map_shards``: Ray Data over the items (one block each) into the worker class
  on an actor pool (``ActorPoolStrategy``): the model pool sized by ``actor_plan`` (GPU actors
  where there are GPUs), or CPU actors for reading. A pool with a maximum above its minimum
  grows as workers join the cluster mid-stage (Ray Data adds actors while its queue is long and
  the cluster has room; ``cluster_maximum``); items are keyed, so results do not depend on
  which actor ran what.
* ``run_task``: one Ray task on a model worker (the warm-up).
* ``map_tasks``: Ray tasks, at most twice the cluster's CPUs in flight, yielded as they finish.
* ``put``: the object store; handles among a worker's constructor arguments are resolved before
  the worker is built (Ray Data does not resolve them), so workers never see Ray.

Output: workers' stdout and stderr reach the driver (``log_to_driver``), so actor errors and the
warm-up's progress lines show in ``ray job logs``. Unless ``--verbose``, what Ray prints about
expected conditions is held back (``quiet_ray``): its info logs, Ray Data's progress bars and
info lines, and the one error-level line of Ray's C++ core that every Ray Data actor pool with
restarts triggers (``NOISE``).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import ray

from ntk_ray.io.accounting import UsageError
from ntk_ray.progress import library_env
from ntk_ray.runtime import MAX_POOL, actor_plan
from ntk_ray.stages.base import ActorPlan


def connect(address: str | None, log, wait_s: float = 600, verbosity: str = "normal") -> dict:
    """Join a cluster or start an embedded local Ray; returns the cluster's resources.

    ``wait_s`` (``--wait-for-resources``): how long a stage may wait for its actors to start
    (``DataContext.wait_for_min_actors_s``) and for any progress at all
    (``execution_no_progress_timeout_s``, at least Ray's default 1800 s) before failing with
    a timeout instead of hanging; raise it when an autoscaling cluster must first add GPU nodes.
    ``verbosity``: ``verbose`` lets Ray's info logs and Ray Data's progress bars through."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    verbose = verbosity == "verbose"
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in the forwarded workers' lines of a log
    level = logging.INFO if verbose else logging.WARNING
    if ray.is_initialized():
        pass
    elif address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=True, logging_level=level)
    else:
        import torch

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        total = _memory_bytes()
        ray.init(num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(), include_dashboard=False,
                 object_store_memory=int(min(2 << 30, max(256 << 20, total * 0.15))), log_to_driver=True,
                 logging_level=level)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.wait_for_min_actors_s = int(wait_s)
    ctx.execution_no_progress_timeout_s = max(1800.0, float(wait_s))
    if not verbose:
        quiet_ray()
    resources = ray.cluster_resources()
    log(f"ray: {resources.get('CPU', 0):.0f} CPUs, {resources.get('GPU', 0):.0f} GPUs")
    return resources


#: what Ray prints about expected conditions, dropped unless --verbose: the C++ core's error
#: line for every actor created with restarts and arguments in the object store (Ray Data passes
#: its context and transform that way to every pool actor; ray-project/ray#53727, #57733: the
#: restarts still work while the driver holds those objects, as it does for the whole stage),
#: and Ray Data's note that its progress bars are off (ours are on)
NOISE = ("has constructor arguments in the object store and max_restarts > 0",
         "Progress bars disabled. To enable, set")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in NOISE)


def quiet_ray() -> None:
    """Hold back Ray's output about expected conditions in this process (the driver): Ray Data's
    console lines below WARNING and those of ``NOISE`` (its log file under the session's
    ``logs/ray-data`` keeps them all), and the ``NOISE`` lines Ray's C++ core writes on stderr."""
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":  # the console, not the log file
            handler.setLevel(max(handler.level, logging.WARNING))
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
    _StderrFilter.install()


class _StderrFilter:
    """File descriptor ``fd`` (2: this process's stderr) through a pipe: a thread passes every
    byte on to where ``fd`` pointed at once, except whole lines that hold a ``NOISE`` text
    (written by Ray's C++ core, which no Python logger reaches). A partial line is passed on
    immediately unless it starts with ``[`` (how the C++ lines start), so live bars still draw.
    ``close`` (also at exit) puts the original back and drains the pipe."""

    _installed: _StderrFilter | None = None

    @classmethod
    def install(cls) -> None:
        if cls._installed is None:
            try:
                cls._installed = cls()
            except OSError:  # no usable fd 2: nothing to filter
                pass

    def __init__(self, fd: int = 2):
        sys.stderr.flush()
        self.fd = fd
        self.target = os.dup(fd)
        read, write = os.pipe()
        self.pipe = os.fstat(write).st_ino
        os.dup2(write, fd)
        os.close(write)
        self.read = read
        self.closed = False
        self.thread = threading.Thread(target=self._pump, name="ntk-ray-stderr", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    @staticmethod
    def keep(line: bytes) -> bool:
        return not any(n.encode() in line for n in NOISE)

    def _write(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(self.target, data):]
            except OSError:
                return

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if self.keep(line))
            if pending and not pending.startswith(b"["):
                out, pending = out + pending, b""
            self._write(out)
        self._write(pending)
        os.close(self.read)

    def close(self) -> None:
        """Put the original ``fd`` back (unless something else has replaced our pipe there since,
        e.g. a test's output capture) and wait for the pump to drain. Once only: a second call
        (the exit hook after an explicit close) must not close ``self.target``'s number again,
        which by then may be another library's descriptor (it once was the AWS SDK's event-loop
        wake-up fd: the process then hung at exit in pyarrow's S3 shutdown)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        try:
            sys.stderr.flush()
            if os.fstat(self.fd).st_ino == self.pipe:
                os.dup2(self.target, self.fd)  # the pipe's write end is gone: the pump drains it and stops
        except (OSError, ValueError):
            pass
        self.thread.join(timeout=2)
        try:
            os.close(self.target)
        except OSError:
            pass


def cluster_maximum() -> dict | None:
    """The resources the cluster can grow to (its autoscaler's node groups x their maximum
    counts), where Ray publishes them (the cluster config in the GCS, read by Ray Data and Ray
    Train the same way); None when unknown. Ray 2.60's own autoscaler (KubeRay's) does not
    publish it, so there the pool's maximum is ``--max-actors`` or what the cluster holds now."""
    try:
        from ray._private.state import state as global_state

        top = global_state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 (an internal API: unknown is always a safe answer)
        return None
    return {k: min(int(v), MAX_POOL * 64) for k, v in top.items()} if top else None


def pool_strategy(size: int, max_size: int | None):
    """A fixed pool of ``size`` actors, or one from ``size`` up to ``max_size``: Ray Data starts
    ``size`` (waiting at most ``wait_for_min_actors_s`` for them) and adds actors while tasks
    queue and the cluster has room for them."""
    if max_size is None or max_size <= size:
        return ray.data.ActorPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(min_size=size, max_size=max_size)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


#: a model or reader actor that dies is restarted at most this often (Ray Data's default is
#: forever), and a batch whose actor died is retried at most ``MAX_TASK_RETRIES`` times: a row
#: that kills its worker fails the run in minutes, naming its shard, not after the no-progress
#: timeout
MAX_RESTARTS = 4
MAX_TASK_RETRIES = 2


class ShardFailedError(RuntimeError):
    """A shard whose worker kept dying (one line; the CLI prints it as ``ntk-ray: error: ...``)."""
    user_facing = True


def _user_error(exc: BaseException) -> BaseException | None:
    """The error of ours inside what Ray raised (``RayTaskError``, Ray Data's wrapped
    ``UserCodeException``, their causes and contexts): a ``UsageError``, ``InputError`` or
    ``ModelError``, or a plain ``ValueError`` whose message names a flag (``--domain: ...``);
    None when there is none (a real crash keeps its traceback)."""
    from ntk_ray.io.accounting import UsageError
    from ntk_ray.io.fs import InputError
    from ntk_ray.models.errors import ModelError

    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if not isinstance(e, ray.exceptions.RayError):
            if isinstance(e, (UsageError, InputError, ModelError)):
                return e
            if type(e) is ValueError and str(e).startswith("--") and "\n" not in str(e):
                return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def unwrap_errors(fn: Callable, *args):
    """``fn(*args)``; an error of ours raised inside Ray comes out as itself (one line for the
    CLI), not as Ray's wrapper with a remote traceback."""
    try:
        return fn(*args)
    except Exception as e:
        cause = _user_error(e)
        if cause is None:
            raise
        raise cause.with_traceback(None) from None


@ray.remote(num_cpus=0)
class _Attempts:
    """Counts the attempts at each item of a ``map_shards`` call, so the item whose worker keeps
    dying can be named."""

    def __init__(self):
        self.started: dict[str, int] = {}
        self.finished: set[str] = set()
        self.errors: list = []  # errors of ours raised by the worker (Ray Data drops their objects)

    def start(self, key: str) -> int:
        self.started[key] = self.started.get(key, 0) + 1
        return self.started[key]

    def finish(self, key: str) -> None:
        self.finished.add(key)

    def error(self, exc) -> None:
        self.errors.append(exc)

    def first_error(self):
        return self.errors[0] if self.errors else None

    def unfinished(self) -> dict[str, int]:
        return {k: n for k, n in self.started.items() if k not in self.finished}


def _item_key(batch) -> str:
    import json

    return json.dumps(batch.slice(0, 1).to_pylist()[0], sort_keys=True, default=str)


def _actors_timed_out(exc: BaseException) -> bool:
    """Ray Data's timeout for a pool whose minimum did not start (``wait_for_min_actors_s``),
    whatever wraps it."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ray.exceptions.GetTimeoutError) and "starting actors" in str(e):
            return True
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return False


def _room(gpus: int) -> str:
    resources = ray.cluster_resources()
    return f"{resources.get('GPU', 0):g} GPUs" if gpus else f"{resources.get('CPU', 0):g} CPUs"


def describe_item(key: str) -> str:
    """An item of ``map_shards`` in words: a token shard with the input file and rows it holds."""
    import json

    item = json.loads(key)
    path = item.get("path") if isinstance(item, dict) else None
    if not path:
        return key
    try:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["source", "row"])
        sources = sorted(set(t.column("source").to_pylist()))
        rows = f"rows {pc.min(t.column('row')).as_py()}-{pc.max(t.column('row')).as_py()}"
        return f"shard {path} ({', '.join(sources)} {rows})"
    except Exception:  # noqa: BLE001 (a shard that is not a token shard: its path is enough)
        return f"shard {path}"


def _resolving(worker: type, attempts=None) -> type:
    """``worker`` whose constructor arguments that are object refs are fetched first; with
    ``attempts`` (an ``_Attempts`` handle) every call is counted before it runs and after it
    finished."""
    class Resolving(worker):
        def __init__(self, *args):
            super().__init__(*[ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args])

        def __call__(self, batch):
            if attempts is None:
                return super().__call__(batch)
            key = _item_key(batch)
            ray.get(attempts.start.remote(key))
            try:
                result = super().__call__(batch)
            except Exception as e:
                ours = _user_error(e)
                if ours is not None:  # Ray Data's wrapper keeps only its text: hand the object over
                    ray.get(attempts.error.remote(ours))
                raise
            ray.get(attempts.finish.remote(key))
            return result

    Resolving.__name__ = Resolving.__qualname__ = worker.__name__
    return Resolving


class RayExecutor:
    def __init__(self, address: str | None = None, actors: int | None = None, accelerator: str = "auto",
                 wait_for_resources: float = 600, log=print, verbosity: str = "normal",
                 min_actors: int | None = None, max_actors: int | None = None):
        self.verbosity = verbosity
        self.resources = connect(address, log, wait_for_resources, verbosity)
        self.wait_for_resources = float(wait_for_resources)
        self.cpus = int(self.resources.get("CPU", 1))
        self.maximum = cluster_maximum()
        self.sizing = {"requested": actors, "accelerator": accelerator, "min_actors": min_actors,
                       "max_actors": max_actors}
        self.plan: ActorPlan = actor_plan(self.resources, max_resources=self.maximum, **self.sizing)
        self.extra_env: dict[str, str] = {}  # added to every worker's environment
        room = int(self.resources.get("GPU" if self.plan.num_gpus else "CPU", 0))
        if self.plan.size > room:
            log(f"ray: {self.plan.size} model actors need {self.plan.size} {'GPUs' if self.plan.num_gpus else 'CPUs'} "
                f"and the cluster has {room}: each model stage waits up to --wait-for-resources "
                f"{self.wait_for_resources:g} s for workers to join")

    def describe(self) -> str:
        size = f"{self.plan.size}-{self.plan.max_size}" if self.plan.max_size else f"{self.plan.size}"
        return f"{size} x ({'1 GPU' if self.plan.num_gpus else 'CPU'})"

    def _stage_plan(self) -> ActorPlan:
        """The model pool for a stage starting now: sized (where no ``--actors`` fixed it) from
        what the cluster holds now, which may be more than at the start (workers the warm-up
        task's demand brought up); the kind of actor (GPU or CPU) stays that of the start."""
        if self.sizing["requested"] is None:
            plan = actor_plan(ray.cluster_resources(), max_resources=self.maximum, **self.sizing)
            if (plan.device, plan.num_gpus) == (self.plan.device, self.plan.num_gpus):
                self.plan = plan
        return self.plan

    def _reader_pool(self, n_items: int) -> tuple[int, int | None]:
        """CPU actors that read: one per item, at most the cluster's CPUs - 1 now (a CPU stays
        free for the driver), growing to its published maximum's CPUs - 1."""
        now = max(1, min(n_items, int(ray.cluster_resources().get("CPU", 1)) - 1))
        most = min(n_items, int((self.maximum or {}).get("CPU", 0)) - 1)
        return now, (most if most > now else None)

    def _env(self, model: bool = True) -> dict:
        env = {k: os.environ.get(k, v) for k, v in library_env(self.verbosity).items()}  # what the user set stays
        if model and self.plan.threads:
            env["NTK_RAY_THREADS"] = str(self.plan.threads)
        return {"env_vars": env | self.extra_env}

    def map_shards(self, worker: type, args: tuple, items: list[dict], *, model: bool = True,
                   on_result: Callable[[dict], None] | None = None) -> list[dict]:
        if not items:
            return []
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        if model:
            plan = self._stage_plan()
            (size, max_size), gpus, cpus = (plan.size, plan.max_size), plan.num_gpus, plan.num_cpus
        else:  # readers
            (size, max_size), gpus, cpus = self._reader_pool(len(items)), 0, 1
        attempts = _Attempts.remote()
        with warnings.catch_warnings():  # max_restarts & co. have no named parameter yet in Ray 2.60
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(_resolving(worker, attempts), fn_constructor_args=args, batch_size=1,
                                batch_format="pyarrow", compute=pool_strategy(size, max_size), num_gpus=gpus,
                                num_cpus=cpus, runtime_env=self._env(model),
                                max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)

        def results() -> list[dict]:  # as each unit finishes (one row each), so progress is live
            rows = []
            for row in ds.iter_rows():
                rows.append(row)
                if on_result is not None:
                    on_result(row)
            return rows

        try:
            return unwrap_errors(results)
        except Exception as e:
            if _user_error(e) is not None:
                raise
            if _actors_timed_out(e):
                raise UsageError(
                    f"{worker.__name__}: the pool's first {size} actors did not all start within --wait-for-resources "
                    f"{self.wait_for_resources:g} s (each needs {f'{gpus} GPU' if gpus else f'{cpus} CPU'}; the "
                    f"cluster has {_room(gpus)}); add workers, raise --wait-for-resources, or lower --min-actors "
                    "(--actors)") from None
            try:
                ours = ray.get(attempts.first_error.remote(), timeout=30)
                unfinished = ray.get(attempts.unfinished.remote(), timeout=30)
            except Exception:  # noqa: BLE001 (the original error says more than this)
                raise e from None
            if ours is not None:
                raise ours.with_traceback(None) from None
            dying = sorted(k for k, n in unfinished.items() if n > MAX_TASK_RETRIES) or sorted(unfinished)
            if not dying:
                raise
            raise ShardFailedError(
                f"{worker.__name__}: a worker died on every one of its {MAX_TASK_RETRIES + 1} attempts at "
                f"{describe_item(dying[0])}" + (f" (and {len(dying) - 1} more)" if len(dying) > 1 else "") +
                f"; a row there may crash the model worker (out of memory?): {type(e).__name__}") from e
        finally:
            ray.kill(attempts)

    def run_task(self, fn: Callable, *args, gpu: bool = True) -> Any:
        """One task on a model worker. When it needs a GPU the cluster does not have (yet: an
        autoscaling GPU group), it waits at most ``--wait-for-resources`` seconds for one to join
        (the pending task is the autoscaler's demand), then fails with one line instead of
        hanging; once the GPU is there, the task may run as long as it takes."""
        num_gpus = self.plan.num_gpus if gpu else 0
        task = ray.remote(fn).options(num_gpus=num_gpus, num_cpus=1, max_retries=1, runtime_env=self._env())
        ref = task.remote(*args)
        deadline = time.monotonic() + self.wait_for_resources
        while num_gpus and ray.cluster_resources().get("GPU", 0) < num_gpus:
            ready, _ = ray.wait([ref], timeout=min(5.0, max(0.1, deadline - time.monotonic())))
            if ready:
                break
            if time.monotonic() >= deadline:
                ray.cancel(ref, force=True)
                raise UsageError(f"no worker with {num_gpus} GPU joined the cluster within --wait-for-resources "
                                 f"{self.wait_for_resources:g} s (the warm-up needs one); add GPU nodes, raise "
                                 "--wait-for-resources, or use --accelerator cpu")
        return unwrap_errors(ray.get, ref)

    def map_tasks(self, fn: Callable, items: list, *shared) -> Iterator[tuple[int, Any]]:
        task = ray.remote(fn)
        max_in_flight = max(2, 2 * self.cpus)
        pending: dict = {}
        for i, item in enumerate(items):
            pending[task.remote(item, *shared)] = i
            if len(pending) >= max_in_flight:
                done, _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(done[0]), unwrap_errors(ray.get, done[0])
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), unwrap_errors(ray.get, done[0])

    def put(self, obj):
        return ray.put(obj)
