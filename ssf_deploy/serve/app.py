"""The Ray Serve deployment that serves one model of a Triton repository on CPU.

One replica holds one onnxruntime session of the newest version. Requests name their task; each
is validated at the edge (task, dtype, shape, size) and queued; ``@serve.batch`` gathers the
queued requests, whatever their tasks, and whenever the model is free everything waiting runs as
one batch of images with one task index per image (see ``_run``). Each response carries only its
own task's classes.

A task change is a new version in the repository. ``ssf-deploy serve`` redeploys with a new
``user_config`` (on SIGHUP, or when ``--poll`` finds the version). Ray Serve applies it as a
rolling update (measured with Ray 2.60's ``serve.run``): a new replica loads the newest version
and passes its health check before the old one stops taking requests and drains, so no request
fails. Where Ray reconfigures a running replica in place instead, :meth:`SSFModel.reconfigure`
builds the new session in a thread while the old one serves, and swaps them between two
batches. A batch maps task names to indices with the session it runs on, so no request reaches
a task through another version's table.

The module needs Ray Serve and the FastAPI it ships; it is imported only when a server starts.
"""
# no ``from __future__ import annotations``: FastAPI reads the handlers' annotations, and Ray
# ships the deployment class by value, without this module's globals to resolve strings in
import asyncio
import collections
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request              # ships with ray[serve]
from fastapi.responses import JSONResponse

from ..runtime import ort_session
from .repo import latest_version, model_config, signature_of

log = logging.getLogger("ray.serve")

NPY_TYPES = ("application/x-npy", "application/octet-stream")
_HEADER_SLACK = 4096


class RequestError(Exception):
    """A request the model cannot serve: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Loaded:
    """One version of the model, ready to run."""
    version: int
    session: object
    sig: object
    tasks: dict                    # name -> {"name", "index", "num_classes"}
    seconds: float

    def run(self, images: np.ndarray, index: np.ndarray) -> np.ndarray:
        feed = {self.sig.images: images}
        if self.sig.task:
            feed[self.sig.task] = index
        return self.session.run([self.sig.logits], feed)[0]


def load_version(model_dir: str, threads: Optional[int] = None) -> Loaded:
    """The newest version of ``model_dir`` as an onnxruntime session (from the file path: its
    external data are resolved next to it). The task table is the graph's own, checked
    against the version's ``tasks.json``."""
    t0 = time.perf_counter()
    v = latest_version(model_dir)
    if v is None:
        raise RuntimeError(f"no servable version in {model_dir}")
    sig = signature_of(v.path, task_name=(v.tasks[0]["name"] if len(v.tasks) == 1 else None))
    if [(t["name"], t["index"]) for t in sig.tasks] != [(t["name"], t["index"]) for t in v.tasks]:
        raise RuntimeError(f"{v.folder}/tasks.json does not match the model's own task table")
    # a server shares its cores with the HTTP proxy and the event loop: no spin-waiting
    session = ort_session(v.path, providers=["CPUExecutionProvider"], threads=threads,
                          spinning=False, fold_large_constants=True)
    return Loaded(v.version, session, sig, {t["name"]: t for t in sig.tasks},
                  time.perf_counter() - t0)


@dataclass
class Item:
    """One validated request waiting in the batch queue."""
    task: str
    images: np.ndarray

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


def decode_images(body: bytes, content_type: str, chw: tuple, max_images: int) -> np.ndarray:
    """The request's images as float32 ``[n, C, H, W]``; one line for anything else.

    ``.npy`` bodies (``np.save``) carry their dtype and shape in a header read before the data,
    so a wrong dtype or shape is refused without decoding the array; JSON bodies
    (``{"images": [...]}``) are for small hand-made requests.
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in NPY_TYPES:
        f = io.BytesIO(body)
        try:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except Exception as e:
            raise RequestError(400, f"the body is not a .npy array: {str(e).splitlines()[0]}")
        if dtype != np.dtype("<f4") and dtype != np.dtype("=f4"):
            raise RequestError(400, f"images must be float32, got {dtype.name}")
        arr = None
    elif ctype == "application/json":
        try:
            data = json.loads(body)
            arr = np.asarray(data["images"])
        except Exception:
            raise RequestError(400, "a JSON body is {\"images\": [[[[...]]]]} (numbers)")
        if arr.dtype.kind not in "fiu":
            raise RequestError(400, "images must be numbers")
        shape, fortran = arr.shape, False
    else:
        raise RequestError(415, f"send images as application/x-npy (np.save) or "
                                f"application/json, not {ctype or 'no content type'}")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1:] != tuple(chw):
        raise RequestError(400, f"images must be [n,{','.join(map(str, chw))}] (or one "
                                f"[{','.join(map(str, chw))}]), got {list(shape)}")
    if shape[0] < 1:
        raise RequestError(400, "no images in the request")
    if shape[0] > max_images:
        raise RequestError(413, f"{shape[0]} images in one request; this model takes at most "
                                f"{max_images} (its max_batch_size)")
    if arr is None:
        count = int(np.prod(shape))
        offset = f.tell()
        if len(body) - offset != count * 4:
            raise RequestError(400, f"the .npy body holds {len(body) - offset} data bytes, its "
                                    f"header says {count * 4}")
        arr = np.frombuffer(body, dtype="<f4", count=count, offset=offset)
        arr = arr.reshape(shape, order="F" if fortran else "C")
    arr = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
    if not np.isfinite(arr).all():
        raise RequestError(400, "images hold NaN or Inf")
    return arr


class Stats:
    """What the replica did, batch by batch (the evidence that batches mix tasks)."""

    def __init__(self, keep: int = 256):
        self.lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self.images = 0
        self.errors = collections.Counter()
        self.by_tasks = collections.Counter()        # distinct tasks in a batch -> batches
        self.by_requests = collections.Counter()     # requests in a batch -> batches
        self.max_tasks = 0
        self.max_requests = 0
        self.busy_s = 0.0
        self.recent = collections.deque(maxlen=keep)
        self.log = collections.deque(maxlen=100000)     # (start, end, images, tasks) wall clock

    def batch(self, version: int, tasks: list, images: int, seconds: float) -> None:
        end = time.time()
        with self.lock:
            self.log.append((end - seconds, end, images, len(set(tasks))))
            self.batches += 1
            self.requests += len(tasks)
            self.images += images
            k = len(set(tasks))
            self.by_tasks[k] += 1
            self.by_requests[len(tasks)] += 1
            self.max_tasks = max(self.max_tasks, k)
            self.max_requests = max(self.max_requests, len(tasks))
            self.busy_s += seconds
            self.recent.append({"version": version, "requests": len(tasks), "images": images,
                                "tasks": sorted(set(tasks)), "ms": round(seconds * 1e3, 2)})

    def window(self, since: float) -> dict:
        """The batches that started after ``since`` (this machine's clock): what a benchmark
        compares with its own timer."""
        with self.lock:
            rows = [r for r in self.log if r[0] >= since]
        if not rows:
            return {"batches": 0, "images": 0}
        return {"batches": len(rows), "images": sum(r[2] for r in rows),
                "first_start": rows[0][0], "last_end": rows[-1][1],
                "busy_seconds": round(sum(r[1] - r[0] for r in rows), 4),
                "max_distinct_tasks_in_a_batch": max(r[3] for r in rows),
                "mean_images_per_batch": round(sum(r[2] for r in rows) / len(rows), 3)}

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[str(status)] += 1

    def as_dict(self) -> dict:
        with self.lock:
            return {"batches": self.batches, "requests": self.requests, "images": self.images,
                    "errors": dict(self.errors),
                    "batches_by_distinct_tasks": {str(k): v for k, v in
                                                  sorted(self.by_tasks.items())},
                    "batches_by_requests": {str(k): v for k, v in
                                            sorted(self.by_requests.items())},
                    "max_distinct_tasks_in_a_batch": self.max_tasks,
                    "max_requests_in_a_batch": self.max_requests,
                    "busy_seconds": round(self.busy_s, 4), "recent": list(self.recent)[-32:]}


def _metrics(model: str):
    """Prometheus metrics through Ray's metrics agent (``--metrics-port``); None when the
    agent is not there (the JSON stats still are)."""
    try:
        from ray.util import metrics as M
        return {
            "requests": M.Counter("ssf_requests_total", "Requests answered, by task and code.",
                                  tag_keys=("model", "task", "code")),
            "batch_images": M.Histogram("ssf_batch_images", "Images per executed batch.",
                                        boundaries=[1, 2, 4, 8, 16, 32, 64],
                                        tag_keys=("model",)),
            "batch_tasks": M.Histogram("ssf_batch_distinct_tasks",
                                       "Distinct tasks per executed batch.",
                                       boundaries=[1, 2, 3, 4, 8, 16], tag_keys=("model",)),
            "latency": M.Histogram("ssf_batch_seconds", "Batch execution time.",
                                   boundaries=[.005, .01, .025, .05, .1, .25, .5, 1, 2.5],
                                   tag_keys=("model",)),
            "version": M.Gauge("ssf_model_version", "The version being served.",
                               tag_keys=("model",)),
        }
    except Exception:     # metrics are an operator convenience, never a reason not to serve
        return None


def build_app(model_dir: str, *, name: str, max_batch_size: Optional[int] = None,
              batch_wait_s: Optional[float] = None, threads: Optional[int] = None,
              replicas: int = 1, version: int = 0, request_timeout_s: float = 60.0):
    """The Ray Serve application for ``model_dir`` (a model folder of a Triton repository).

    ``max_batch_size`` and the batch wait default to the model's ``config.pbtxt``
    (``max_batch_size``, ``dynamic_batching.max_queue_delay_microseconds``): one config drives
    Triton and this server alike. ``version`` is the ``user_config``: a different value
    reloads every replica in place.
    """
    from ray import serve

    with open(os.path.join(model_dir, "config.pbtxt")) as fh:
        cfg = model_config(fh.read())
    mbs = int(max_batch_size or cfg.max_batch_size or 16)
    wait = float(batch_wait_s if batch_wait_s is not None else
                 (cfg.dynamic_batching.max_queue_delay_microseconds or 2000) / 1e6)
    api = FastAPI(title=f"ssf-deploy: {name}")

    @serve.deployment(name=name, num_replicas=int(replicas),
                      ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=max(4 * mbs, 32), max_queued_requests=-1,
                      graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=20,
                      health_check_period_s=2, health_check_timeout_s=30)
    @serve.ingress(api)
    class SSFModel:
        def __init__(self):
            self.model_dir, self.name, self.mbs = model_dir, name, mbs
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="ssf-infer")
            self.loader = ThreadPoolExecutor(1, thread_name_prefix="ssf-load")
            self.current: Loaded = load_version(model_dir, threads)
            self.stats = Stats()
            self.metrics = _metrics(name)
            self.reloads = []
            self.reload_lock = asyncio.Lock()
            self.waiting = collections.deque()     # (Ray's batch, future) waiting for the model
            self.worker = None
            self._run.set_max_batch_size(mbs)
            self._run.set_batch_wait_timeout_s(wait)
            self._gauge()
            log.info("ssf-deploy: %s version %d loaded in %.2f s (%d tasks, batch <= %d images, "
                     "wait %.1f ms)", name, self.current.version, self.current.seconds,
                     len(self.current.tasks), mbs, wait * 1e3)

        def _gauge(self):
            if self.metrics:
                self.metrics["version"].set(self.current.version, tags={"model": self.name})

        async def reconfigure(self, config: dict):
            """Ray Serve calls this in place when the ``user_config`` changes: load the newest
            version beside the current one, then switch (no request is dropped)."""
            async with self.reload_lock:
                v = latest_version(self.model_dir)
                if v is None or v.version == self.current.version:
                    return
                t0 = time.perf_counter()
                new = await asyncio.get_running_loop().run_in_executor(
                    self.loader, load_version, self.model_dir, threads)
                old, self.current = self.current, new      # one assignment: atomic
                took = time.perf_counter() - t0
                added = sorted(set(new.tasks) - set(old.tasks))
                removed = sorted(set(old.tasks) - set(new.tasks))
                self.reloads.append({"from": old.version, "to": new.version,
                                     "seconds": round(took, 3), "added": added,
                                     "removed": removed, "at": time.time()})
                self._gauge()
                log.info("ssf-deploy: %s switched version %d -> %d in %.2f s (added %s, "
                         "removed %s)", self.name, old.version, new.version, took, added,
                         removed)

        def check_health(self):
            if self.current is None:
                raise RuntimeError("no model loaded")

        # ---------------------------------------------------------------- batching

        # Ray Serve 2.60 forms the next batch as soon as the previous one has started (it then
        # waits for a free slot of max_concurrent_batches), so under load a slow model would
        # run many one-request batches back to back. The batches Ray forms are therefore handed
        # over at once (many concurrent slots) and coalesced here: whenever the model is free,
        # everything waiting runs as one batch of up to max_batch_size images, whatever the
        # tasks (what Triton's dynamic batcher does).

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002, max_concurrent_batches=1024,
                     batch_size_fn=lambda items: sum(i.n for i in items))
        async def _run(self, items: list) -> list:
            fut = asyncio.get_running_loop().create_future()
            self.waiting.append((items, fut))
            if self.worker is None or self.worker.done():
                self.worker = asyncio.ensure_future(self._drain())
            return await fut

        async def _drain(self):
            while self.waiting:
                groups, n = [], 0
                while self.waiting and (not groups or
                                        n + sum(i.n for i in self.waiting[0][0]) <= self.mbs):
                    items, fut = self.waiting.popleft()
                    groups.append((items, fut))
                    n += sum(i.n for i in items)
                flat = [it for items, _ in groups for it in items]
                try:
                    out = await self._execute(flat)
                except Exception as e:           # answered, never left hanging
                    for _, fut in groups:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                at = 0
                for items, fut in groups:
                    if not fut.done():
                        fut.set_result(out[at:at + len(items)])
                    at += len(items)

        async def _execute(self, items: list) -> list:
            cur = self.current               # one version for the whole batch
            out: list = [None] * len(items)
            keep = []
            for j, it in enumerate(items):
                t = cur.tasks.get(it.task)
                if t is None:                # removed by a switch while it waited
                    out[j] = RequestError(404, f"task '{it.task}' is not in version "
                                               f"{cur.version} of {self.name}")
                else:
                    keep.append((j, t))
            if keep:
                images = np.concatenate([items[j].images for j, _ in keep])
                index = np.concatenate([np.full(items[j].n, t["index"], np.int64)
                                        for j, t in keep])
                t0 = time.perf_counter()
                logits = await asyncio.get_running_loop().run_in_executor(
                    self.pool, cur.run, images, index)
                took = time.perf_counter() - t0
                tasks = [t["name"] for _, t in keep]
                self.stats.batch(cur.version, tasks, len(images), took)
                if self.metrics:
                    tag = {"model": self.name}
                    self.metrics["batch_images"].observe(len(images), tags=tag)
                    self.metrics["batch_tasks"].observe(len(set(tasks)), tags=tag)
                    self.metrics["latency"].observe(took, tags=tag)
                at = 0
                for j, t in keep:
                    n = items[j].n
                    out[j] = (cur.version, logits[at:at + n, : int(t["num_classes"])])
                    at += n
            return out

        # ---------------------------------------------------------------- HTTP

        def _error(self, status: int, message: str, task: str = "-"):
            self.stats.error(status)
            if self.metrics:
                self.metrics["requests"].inc(tags={"model": self.name, "task": task,
                                                   "code": str(status)})
            return JSONResponse({"error": message}, status_code=status)

        @api.post("/infer/{task}")
        async def infer(self, task: str, request: Request):
            cur = self.current
            if task not in cur.tasks:
                return self._error(404, f"unknown task '{task}'; {self.name} version "
                                        f"{cur.version} serves {', '.join(sorted(cur.tasks))}")
            length = int(request.headers.get("content-length") or 0)
            limit = self.mbs * int(np.prod(cur.sig.chw)) * 4 + _HEADER_SLACK
            ctype = request.headers.get("content-type", "")
            if length > limit and ctype.split(";")[0].strip() in NPY_TYPES:
                return self._error(413, f"request of {length} bytes: this model takes at "
                                        f"most {self.mbs} images per request (its "
                                        f"max_batch_size)", task)
            try:
                images = decode_images(await request.body(), ctype, cur.sig.chw, self.mbs)
                got = await self._run(Item(task, images))
                if isinstance(got, RequestError):
                    raise got
            except RequestError as e:
                return self._error(e.status, str(e), task)
            version, logits = got
            if self.metrics:
                self.metrics["requests"].inc(tags={"model": self.name, "task": task,
                                                   "code": "200"})
            return {"model": self.name, "version": version, "task": task,
                    "logits": logits.tolist()}

        @api.get("/")
        def info(self):
            cur = self.current
            return {"model": self.name, "version": cur.version, "kind": cur.sig.kind,
                    "inputs": {"images": [None, *cur.sig.chw], "dtype": "float32"},
                    "max_batch_size": self.mbs, "batch_wait_ms": wait * 1e3,
                    "tasks": sorted(cur.tasks.values(), key=lambda t: t["index"]),
                    "loaded_seconds": round(cur.seconds, 3), "reloads": self.reloads}

        @api.get("/ready")
        def ready(self):
            return {"ready": self.current is not None, "version": self.current.version}

        @api.get("/stats")
        def get_stats(self, since: Optional[float] = None):
            out = {"model": self.name, "version": self.current.version, "pid": os.getpid(),
                   **self.stats.as_dict()}
            if since is not None:
                out["window"] = self.stats.window(float(since))
            return out

    return SSFModel.options(user_config={"version": int(version)}).bind()
