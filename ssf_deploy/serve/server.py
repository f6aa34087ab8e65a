"""``ssf-deploy serve DIR``: a local Ray cluster, Ray Serve's HTTP proxy, one application per
model of the repository; the process stays in front until SIGTERM/SIGINT.

* Loopback by default (``host="127.0.0.1"``); ``--host 0.0.0.0`` exposes it.
* Task changes: SIGHUP (Triton's explicit model control: nothing changes until asked) or
  ``poll`` seconds (Triton's poll mode) redeploys every model whose repository has a newer
  version, with a new ``user_config``: Ray Serve rolls the replicas (the new one loads the
  version and passes its health check before the old one drains), no request fails.
* Health: Ray Serve's ``/-/healthz`` and ``/-/routes``, and per model ``/<model>/ready``.
  Metrics: Ray's Prometheus endpoint on ``metrics_port`` (Ray Serve's own request metrics and
  this server's ``ssf_*`` batch metrics); per model ``/<model>/stats`` as JSON.
* Shutdown: SIGTERM or SIGINT drains the in-flight requests (Ray Serve's graceful shutdown),
  stops Ray, and returns.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import SSFDeployError, UsageError
from .repo import latest_version, read_model

__all__ = ["ServeOptions", "serve_repository", "models_in"]


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    models: list = field(default_factory=list)      # names; empty: every ONNX model
    max_batch_size: Optional[int] = None            # default: each config.pbtxt's
    batch_wait_ms: Optional[float] = None           # default: each config.pbtxt's
    threads: Optional[int] = None                   # onnxruntime intra-op threads per replica
    replicas: int = 1
    poll: Optional[float] = None                    # seconds between repository scans
    metrics_port: Optional[int] = None
    num_cpus: Optional[int] = None
    request_timeout_s: float = 60.0


def models_in(repo: str, names: list) -> dict:
    """``{name: model folder}`` to serve: the named ones, or every ONNX model in ``repo``."""
    if names:
        return {n: read_model(repo, n) for n in names}
    if latest_version(repo) is not None:          # a model folder given directly
        return {os.path.basename(os.path.normpath(repo)): os.path.abspath(repo)}
    if not os.path.isdir(repo):
        raise UsageError(f"model repository not found: {repo}")
    out = {}
    for n in sorted(os.listdir(repo)):
        v = latest_version(os.path.join(repo, n))
        if v is not None and v.path.endswith(".onnx"):
            out[n] = os.path.abspath(os.path.join(repo, n))
    if not out:
        read_model(repo)          # raises the one-line "holds no servable model"
    return out


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise SSFDeployError(f"serving needs Ray Serve ({e.name} is missing): pip install "
                             f"\"ssf-deploy[serve]\"") from None
    return ray, serve


def serve_repository(repo: str, opts: ServeOptions,
                     say: Callable[[str], None] = lambda m: print(m, flush=True),
                     stop: Optional[threading.Event] = None) -> None:
    """Serve ``repo`` until SIGTERM/SIGINT (or ``stop`` is set); see the module docstring."""
    from .app import build_app
    models = models_in(repo, list(opts.models))
    ray, serve = _import_ray()
    stop = stop or threading.Event()
    reload_now = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    old = {}
    if main:
        # Ray's processes (GCS, raylet, replicas) start with SIGHUP and SIGINT ignored: a
        # SIGHUP or a Ctrl-C sent to the whole process group reaches this process, which
        # reloads or drains, instead of killing the cluster under it mid-request.
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGINT)}
    t0 = time.perf_counter()
    init = dict(num_cpus=opts.num_cpus or os.cpu_count(), include_dashboard=False,
                logging_level="WARNING", log_to_driver=False,
                object_store_memory=128 * 1024 * 1024)
    if opts.metrics_port:
        init["_metrics_export_port"] = int(opts.metrics_port)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(**init)
        serve.start(http_options={"host": opts.host, "port": int(opts.port),
                                  "request_timeout_s": float(opts.request_timeout_s)})
        if main:
            def on_stop(signum, frame):
                stop.set()

            def on_hup(signum, frame):
                reload_now.set()
            old[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_stop)
            signal.signal(signal.SIGINT, on_stop)
            signal.signal(signal.SIGHUP, on_hup)
        versions = {}

        def deploy(name: str, folder: str) -> int:
            v = latest_version(folder).version
            app = build_app(folder, name=name, max_batch_size=opts.max_batch_size,
                            batch_wait_s=None if opts.batch_wait_ms is None
                            else opts.batch_wait_ms / 1e3, threads=opts.threads,
                            replicas=opts.replicas, version=v)
            serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
            versions[name] = v
            return v

        for name, folder in models.items():
            deploy(name, folder)
        _wait_running(serve, list(models), stop)
        url = f"http://{opts.host}:{opts.port}"
        for name, folder in models.items():
            v = latest_version(folder)
            say(f"serving {url}/{name}  version {v.version}, {len(v.tasks)} task(s): "
                f"{', '.join(t['name'] for t in v.tasks)}")
        say(f"ready in {time.perf_counter() - t0:.1f} s; health {url}/-/healthz"
            + (f"; metrics http://{opts.host}:{opts.metrics_port}/metrics"
               if opts.metrics_port else "") + f"; pid {os.getpid()} (SIGHUP: load new "
            f"versions, SIGTERM: drain and stop)")
        next_poll = time.monotonic() + (opts.poll or 0)
        while not stop.is_set():
            stop.wait(0.2)
            due = opts.poll and time.monotonic() >= next_poll
            if not (reload_now.is_set() or due):
                continue
            reload_now.clear()
            next_poll = time.monotonic() + (opts.poll or 0)
            for name, folder in models.items():
                v = latest_version(folder)
                if v is not None and v.version != versions[name]:
                    t1 = time.perf_counter()
                    old_v = versions[name]
                    deploy(name, folder)
                    _wait_running(serve, [name], stop)
                    say(f"{name}: version {old_v} -> {v.version} in "
                        f"{time.perf_counter() - t1:.2f} s ({len(v.tasks)} task(s))")
        say("draining in-flight requests and stopping")
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        try:
            ray.shutdown()
        except Exception:
            pass
        for s, h in old.items():
            signal.signal(s, h)
    say("stopped")


def _wait_running(serve, names: list, stop: threading.Event, timeout: float = 300) -> None:
    """Until every named application is RUNNING (its replicas answer health checks)."""
    end = time.monotonic() + timeout
    while not stop.is_set():
        st = serve.status().applications
        states = {n: str(getattr(st.get(n), "status", "MISSING")) for n in names}
        if all(s.endswith("RUNNING") for s in states.values()):
            return
        bad = [n for n, s in states.items() if s.endswith("DEPLOY_FAILED")]
        if bad:
            msg = getattr(st[bad[0]], "message", "") or ""
            raise SSFDeployError(f"model '{bad[0]}' failed to deploy: "
                                 f"{msg.strip().splitlines()[-1] if msg.strip() else '?'}")
        if time.monotonic() > end:
            raise SSFDeployError(f"models not running after {timeout:.0f} s: {states}")
        time.sleep(0.2)
