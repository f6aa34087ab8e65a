"""Serving: the Triton model repository (checked against Triton's own model_config.proto) and a
real server process (``ssf-deploy serve``, Ray Serve) on loopback, under bounded load.

References nobody here wrote: tritonclient's ModelConfig message, each task's own fused model
(the real fuser, run in torch), Ray Serve's HTTP proxy and its Prometheus endpoint. One server
is shared by the tests below (in file order); each wait is bounded.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve", reason="serving needs pip install \"ssf-deploy[serve]\"")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

import ssf_deploy  # noqa: E402
from ssf_deploy.bundle import task_table  # noqa: E402
from ssf_deploy.errors import SSFDeployError, UsageError  # noqa: E402
from ssf_deploy.serve import (ServeClient, ServeError, latest_version, model_config,  # noqa: E402
                              tasks_of_config, validate_config, write_triton_repo)
from ssf_deploy.serve.repo import signature_of  # noqa: E402

from test_bundle import _base, _task  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

TASKS = [("a", 1, 5), ("b", 2, 7), ("c", 3, 5)]     # name, seed, classes
START_TIMEOUT = 240          # a shared 2-core machine: Ray's start is ~7 s idle, ~45 s busy
CLIENT_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ssf_deploy", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


class Server:
    """``ssf-deploy serve`` as its own process group (Ray's processes are its children)."""

    def __init__(self, repo: str, log: str):
        self.repo, self.log_path = repo, log
        self.port, self.metrics = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ssf_deploy", "serve", self.repo, "--port", str(self.port),
             "--metrics-port", str(self.metrics), "--threads", "1", "--num-cpus", "2"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()})
        client = ServeClient(self.url, "tasks", timeout=5)
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.tail()}")
            if client.ready():
                return self
            time.sleep(0.5)
        raise AssertionError(f"server not ready in {START_TIMEOUT} s: {self.tail()}")

    def tail(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-3000:]

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)


def _images(seed: int, n: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("serve"))
    base = _base(tmp, "vit")
    made = {name: _task(tmp, "vit", base, seed, classes, name=name)
            for name, seed, classes in TASKS + [("late", 9, 6)]}
    bundle = os.path.join(tmp, "b", "tasks.onnx")
    ssf_deploy.bundle([made[n][0] for n, _, _ in TASKS], out=bundle, base_weights=base,
                      names=[n for n, _, _ in TASKS], max_classes=8, check_fused=False)
    repo = os.path.join(tmp, "repo")
    write_triton_repo(bundle, repo, max_batch_size=8, queue_delay_us=5000)
    x = torch.zeros(2, 3, 32, 32)
    fused = {n: ssf_deploy.fuse(m.eval(), x) for n, (_, m) in made.items()}
    server = Server(repo, os.path.join(tmp, "server.log"))
    state = {"tmp": tmp, "base": base, "made": made, "bundle": bundle, "repo": repo,
             "fused": fused, "server": server}
    yield state
    server.kill()


def _reference(served, task: str, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return served["fused"][task](torch.from_numpy(x)).numpy()


# ------------------------------------------------------------------------------ the artefact


def test_repository_config_is_valid_against_tritons_schema(served):
    repo = served["repo"]
    with open(os.path.join(repo, "tasks", "config.pbtxt")) as f:
        text = f.read()
    cfg = model_config(text)             # tritonclient's inference.ModelConfig
    from tritonclient.grpc import model_config_pb2 as pb2
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 5000
    ins = {i.name: i for i in cfg.input}
    assert set(ins) == {"images", "task"}
    assert ins["images"].data_type == pb2.TYPE_FP32 and list(ins["images"].dims) == [3, 32, 32]
    assert ins["task"].data_type == pb2.TYPE_INT64 and list(ins["task"].dims) == [1]
    assert ins["task"].HasField("reshape") and list(ins["task"].reshape.shape) == []
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [8])]
    # the task table: in the config (a remote client's view) and next to it, = the bundle's
    table = task_table(served["bundle"])
    assert tasks_of_config(text) == table
    with open(os.path.join(repo, "tasks", "tasks.json")) as f:
        assert json.load(f)["tasks"] == table
    v = latest_version(os.path.join(repo, "tasks"))
    assert v.version == 1 and v.path.endswith(os.path.join("1", "model.onnx"))
    # the version folder is a bundle in its own right; its big file is a hard link
    assert ssf_deploy.verify_bundle(v.path, check_fused=False).passed
    src = os.path.join(os.path.dirname(served["bundle"]), "tasks.onnx.backbone")
    assert os.path.samefile(src, os.path.join(v.folder, "model.onnx.backbone"))
    # the schema refuses what Triton would refuse
    sig = signature_of(v.path)
    with pytest.raises(SSFDeployError, match="not a valid Triton model config"):
        validate_config(text.replace("max_batch_size", "max_batch"), sig)
    with pytest.raises(SSFDeployError, match="not a valid Triton model config"):
        validate_config(text.replace("TYPE_INT64", "TYPE_LONG"), sig)
    with pytest.raises(SSFDeployError, match="input 'task' is declared TYPE_INT32"):
        validate_config(text.replace("TYPE_INT64", "TYPE_INT32"), sig)
    with pytest.raises(SSFDeployError, match="no dynamic_batching"):
        validate_config(text.split("dynamic_batching")[0] + "\n", sig)


def test_tensorrt_variant_is_tied_to_the_bundle(served, tmp_path):
    """The plan is opaque without TensorRT: checked here are its config (Triton's schema), its
    tie to the bundle it was built from (the engine sidecar's sha256) and its batch bound."""
    from ssf_deploy.engine import build_sidecar
    plan = str(tmp_path / "tasks.plan")
    with open(plan, "wb") as f:
        f.write(b"\0" * 64)
    side = build_sidecar(served["bundle"], plan, {"batch": {"min": 1, "opt": 4, "max": 4}})
    with open(plan + ".json", "w") as f:
        json.dump(side, f)
    repo = str(tmp_path / "repo")
    rep = write_triton_repo(served["bundle"], repo, engine=plan, max_batch_size=16)
    assert rep.trt_model == "tasks_trt"
    with open(os.path.join(repo, "tasks_trt", "config.pbtxt")) as f:
        cfg = model_config(f.read())
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert cfg.max_batch_size == 4          # the engine's profile, not the asked 16
    assert os.path.samefile(plan, os.path.join(repo, "tasks_trt", "1", "model.plan"))
    side["onnx_sha256"] = "0" * 64
    with open(plan + ".json", "w") as f:
        json.dump(side, f)
    with pytest.raises(UsageError, match="built from another graph"):
        write_triton_repo(served["bundle"], str(tmp_path / "repo2"), engine=plan)


def test_cli_writes_a_repository_and_refuses_bad_input(served, tmp_path):
    a = served["made"]["a"][0]
    r = _cli("bundle", a, "--name", "a", "--base-weights", served["base"], "--triton-repo",
             str(tmp_path / "r"), "--model", "one", "--fused-check", "none", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "model 'one' version 1" in r.stdout
    assert latest_version(str(tmp_path / "r" / "one")).tasks[0]["name"] == "a"
    assert sorted(os.listdir(tmp_path / "r")) == ["one"]        # no temp folder left in it
    r = _cli("bundle", a, "--base-weights", served["base"], "--triton-repo",
             str(tmp_path / "r"), "--model", "bad/name", "--quiet")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "model name" in r.stderr
    r = _cli("serve", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "not found" in r.stderr


# ------------------------------------------------------------------------------ the server


def _load(client, n_clients, per_client, names, seed, results, errors, bad=None):
    """``n_clients`` threads, each ``per_client`` requests of 1-3 images for a task drawn from
    ``names``; every answer or error is kept (with what was sent)."""
    def run(k):
        rng = np.random.default_rng(seed + k)
        for i in range(per_client):
            task = names[int(rng.integers(len(names)))]
            n = int(rng.integers(1, 4))
            s = seed * 100000 + k * 1000 + i
            try:
                results.append((task, s, n, client.infer(task, _images(s, n))))
            except ServeError as e:
                errors.append((task, s, e.status, str(e)))
    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_clients)]
    return threads


def _check(served, results):
    worst = 0.0
    for task, s, n, got in results:
        ref = _reference(served, task, _images(s, n))
        assert got.shape == ref.shape, (task, got.shape, ref.shape)     # only its classes
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst < 1e-4, worst
    return worst


def test_mixed_tasks_under_load_none_lost_none_crossed_bad_requests_refused(served):
    server = served["server"].start()
    client = ServeClient(server.url, "tasks", timeout=CLIENT_TIMEOUT)
    results, errors = [], []
    threads = _load(client, 8, 10, ["a", "b", "c"], 1, results, errors)
    bad = {}

    def bad_requests():
        x = _images(0, 2)
        cases = {"unknown task": ("zzz", x), "wrong dtype": ("a", x.astype(np.float64)),
                 "wrong shape": ("a", x[:, :, :16]), "oversized batch": ("a", _images(0, 9)),
                 "not an array": ("a", b"hello")}
        for what, (task, arr) in cases.items():
            try:
                if isinstance(arr, bytes):
                    client.infer_raw(task, arr)
                else:
                    client.infer(task, arr)
                bad[what] = (None, "served")
            except ServeError as e:
                bad[what] = (e.status, str(e))
            time.sleep(0.2)
    threads.append(threading.Thread(target=bad_requests))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert errors == []
    assert len(results) == 80                     # zero lost
    _check(served, results)                       # zero crossed: each vs its own fused model
    assert bad["unknown task"][0] == 404 and "unknown task 'zzz'" in bad["unknown task"][1]
    assert bad["wrong dtype"][0] == 400 and "float32" in bad["wrong dtype"][1]
    assert bad["wrong shape"][0] == 400 and "[n,3,32,32]" in bad["wrong shape"][1]
    assert bad["oversized batch"][0] == 413 and "at most 8" in bad["oversized batch"][1]
    assert bad["not an array"][0] == 400
    # the server's own statistics: batches held several requests of different tasks
    stats = client.stats()
    assert stats["max_distinct_tasks_in_a_batch"] >= 2, stats
    assert stats["requests"] >= 80 and stats["batches"] < stats["requests"]
    assert all(b["images"] <= 8 for b in stats["recent"])
    assert stats["errors"].get("404") and stats["errors"].get("413")
    # ... and the same through Ray's Prometheus endpoint (exported every few seconds)
    text, end = "", time.monotonic() + 60
    while time.monotonic() < end and "ssf_batch_distinct_tasks_bucket" not in text:
        time.sleep(1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics",
                                      timeout=10).read().decode()
    assert "ssf_batch_distinct_tasks_bucket" in text and "ssf_requests_total" in text
    health = urllib.request.urlopen(f"{server.url}/-/healthz", timeout=10).read()
    assert health.strip() == b"success"
    print(f"\n80 requests from 8 clients in {time.monotonic() - t0:.1f} s; batches by distinct "
          f"tasks {stats['batches_by_distinct_tasks']}")


def test_tasks_change_while_serving_without_a_failed_request(served):
    server = served["server"]
    client = ServeClient(server.url, "tasks", timeout=CLIENT_TIMEOUT)
    stop, results, errors = threading.Event(), [], []

    def keep_asking(k):           # tasks present before and after the change
        i = 0
        while not stop.is_set():
            s = 7000000 + k * 10000 + i
            task = ["a", "c"][i % 2]
            try:
                results.append((task, s, 1, client.infer(task, _images(s, 1))))
            except ServeError as e:
                errors.append((task, s, e.status, str(e)))
            i += 1
            time.sleep(0.05)      # steady traffic, not a CPU hog next to the CLI's own work
    threads = [threading.Thread(target=keep_asking, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        # the operator's step: a new version (late added, b removed), then SIGHUP
        r = _cli("bundle", "--into", os.path.join(served["repo"], "tasks"),
                 served["made"]["late"][0], "--name", "late", "--remove", "b",
                 "--base-weights", served["base"], "--quiet")
        assert r.returncode == 0, r.stderr
        assert "version 2" in r.stdout
        t0 = time.monotonic()
        os.kill(server.proc.pid, signal.SIGHUP)
        end = t0 + 120
        while client.info()["version"] != 2:
            assert time.monotonic() < end, server.tail()
            time.sleep(0.05)
        switched = time.monotonic() - t0
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and len(results) > 8
    _check(served, results)
    info = client.info()
    assert [t["name"] for t in info["tasks"]] == ["a", "c", "late"]
    assert [t["index"] for t in info["tasks"]] == [0, 2, 3]       # b's index is retired
    x = _images(99, 2)
    np.testing.assert_allclose(client.infer("late", x), _reference(served, "late", x),
                               atol=1e-4, rtol=0)
    with pytest.raises(ServeError, match="unknown task 'b'") as e:
        client.infer("b", x)
    assert e.value.status == 404
    print(f"\ntask change: SIGHUP -> version 2 served in {switched:.2f} s; {len(results)} "
          f"requests during it, 0 failed")


def test_killed_server_gives_errors_not_hangs_and_a_restart_serves(served):
    server = served["server"]
    client = ServeClient(server.url, "tasks", timeout=5)
    results, errors = [], []
    threads = _load(client, 6, 40, ["a", "c", "late"], 3, results, errors)
    for t in threads:
        t.start()
    while len(results) < 6:
        time.sleep(0.05)
    t0 = time.monotonic()
    server.kill()                                 # SIGKILL, the whole process group
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung on a dead server"
    took = time.monotonic() - t0
    assert errors, "no request failed although the server was killed mid-load"
    assert all(s is None or s >= 500 for _, _, s, _ in errors), errors[:3]
    _check(served, results)                       # what was answered was right
    assert took < 60, took
    server.start()                                # the same repository: version 2
    x = _images(5, 3)
    np.testing.assert_allclose(client.infer("late", x), _reference(served, "late", x),
                               atol=1e-4, rtol=0)
    assert client.info()["version"] == 2


def test_sigterm_drains_and_stops(served):
    server = served["server"]
    client = ServeClient(server.url, "tasks", timeout=CLIENT_TIMEOUT)
    results, errors = [], []
    threads = _load(client, 3, 3, ["a", "c"], 4, results, errors)
    for t in threads:
        t.start()
    while not results:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert server.proc.wait(120) == 0
    assert "draining in-flight requests" in server.tail() and "stopped" in server.tail()
    _check(served, results)
    assert all(s is None or s >= 500 for _, _, s, _ in errors)   # refused after, never wrong
