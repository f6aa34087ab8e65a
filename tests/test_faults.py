"""Faults (issue 14): disk full, no permission, hard kills, early Ctrl-C, malformed values.

Every case ends the same way: one line on stderr that names the cause, exit 2 (130 for Ctrl-C),
and nothing left at or beside the output paths. Disk full and read-only folders are simulated
(a size-limited writer, writes that raise EACCES) because CI cannot mount a tmpfs; hard kills and
signals are real (subprocesses), synchronised on what the child prints, never on timing.
"""
from __future__ import annotations

import builtins
import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch

import ssf_deploy as sd
from ssf_deploy import fileio
from ssf_deploy.errors import (CheckpointError, OutputError, Terminated, UsageError,
                               describe_os_error, find_os_error)
from ssf_deploy.export import export_onnx
from ssf_deploy.fileio import (MANIFEST_FORMAT, OutputSet, atomic_path, check_manifest,
                               check_writable, manifest_path, save_safetensors, sweep_stale)
from ssf_deploy.formats import read_task
from ssf_deploy.formats.checkpoint import save_checkpoint
from ssf_deploy.tools import main

from test_fuse import pretrained_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ helpers

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def _task(folder, seed: int):
    """A tiny SSF task (test_resnet, 5 classes) as a checkpoint, and its base weights."""
    torch.manual_seed(0)
    model = pretrained_like(sd.create_base_model("test_resnet", 5))
    base = os.path.join(folder, "base.safetensors")
    if not os.path.exists(base):
        save_safetensors(model.state_dict(), base)
    torch.manual_seed(seed)
    sd.apply_method(model, "ssf", init_std=0.3)
    ckpt = os.path.join(folder, f"task{seed}.pt")
    sd.save_task(model, ckpt, image_size=32)
    return ckpt, base


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tasks"))
    (a, base), (b, _) = _task(d, 1), _task(d, 2)
    return {"A": a, "B": b, "base": base}


def _fuse_args(ckpt, base, folder, *outputs):
    names = {"onnx": ["--out", "m.onnx"], "weights": ["--save-weights", "w.safetensors"],
             "pack": ["--save-pack", "p.safetensors"]}
    args = ["fuse", ckpt, "--base-weights", base, "--compare-graph", "never", "--quiet"]
    for o in outputs:
        flag, name = names[o]
        args += [flag, os.path.join(folder, name)]
    return args


@pytest.fixture(scope="module")
def fused_set(tasks, tmp_path_factory):
    """One complete `fuse --out --save-weights --save-pack` of task A."""
    d = str(tmp_path_factory.mktemp("fusedA"))
    assert main(_fuse_args(tasks["A"], tasks["base"], d, "onnx", "weights", "pack")) == 0
    return d


def _one_line(rc, err, *needles, code=2) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _names(folder) -> list:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _temps(folder) -> list:
    return [n for n in _names(folder) if n.startswith(fileio.TMP_PREFIX)]


def _must_not_run(monkeypatch, target: str):
    def work(*a, **k):
        raise AssertionError(f"{target} ran: the output should have been refused before the work")
    module, _, name = target.rpartition(".")
    if module in sys.modules:      # a module that a package attribute of the same name hides
        monkeypatch.setattr(sys.modules[module], name, work)    # (ssf_deploy.bundle: a function)
    else:
        monkeypatch.setattr(target, work)


class _LimitedFile:
    """A file whose writes fail with ENOSPC once the folder's byte budget is used up."""

    def __init__(self, f, disk):
        self._f, self._disk = f, disk

    def write(self, data):
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._disk["left"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk["left"] -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _inside(path, folder) -> bool:
    try:
        return os.path.abspath(os.fspath(path)).startswith(os.path.abspath(folder) + os.sep)
    except TypeError:
        return False


def disk_full(monkeypatch, folder, budget: int):
    """Writes into ``folder`` get ``budget`` bytes in all, then ENOSPC (a small tmpfs)."""
    real_open = builtins.open
    disk = {"left": budget}

    def limited_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and \
                _inside(file, folder):
            return _LimitedFile(f, disk)
        return f
    monkeypatch.setattr(builtins, "open", limited_open)
    return disk


def read_only(monkeypatch, folder):
    """Creating, writing or renaming anything in ``folder`` fails with EACCES."""
    def deny(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    real_os_open, real_open = os.open, builtins.open
    real_mkdir, real_replace, real_rename = os.mkdir, os.replace, os.rename
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def os_open(path, flags, *a, **k):
        if flags & writes and _inside(path, folder):
            deny(path)
        return real_os_open(path, flags, *a, **k)

    def py_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and \
                _inside(file, folder):
            deny(file)
        return real_open(file, mode, *a, **k)

    def mkdir(path, *a, **k):
        if _inside(path, folder):
            deny(path)
        return real_mkdir(path, *a, **k)

    def move(real):
        def f(src, dst, *a, **k):
            if _inside(dst, folder) or _inside(src, folder):
                deny(dst)
            return real(src, dst, *a, **k)
        return f
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "replace", move(real_replace))
    monkeypatch.setattr(os, "rename", move(real_rename))


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _default_sigint():
    """A child starts with SIGINT at its default, as from a terminal. Started from a background
    job (``pytest ... &``) it would inherit SIG_IGN, which the launcher rightly leaves alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _child(code: str, *args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or _env(), cwd=ROOT,
                            preexec_fn=_default_sigint, **kw)


def _wait_for(proc: subprocess.Popen, marker: str) -> None:
    """Read the child's stdout until ``marker`` (what it prints when it is where we want it)."""
    for line in proc.stdout:
        if marker in line:
            return
    out, err = proc.communicate(timeout=60)
    raise AssertionError(f"child exited ({proc.returncode}) before {marker!r}: {err[-3000:]}")


# ------------------------------------------------------------------------------- 1 disk full

def test_os_errors_are_mapped_in_one_place():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert describe_os_error(full, "out/m.onnx") == "disk full writing out/m.onnx"
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert describe_os_error(quota, "x") == "disk full writing x (disk quota exceeded)"
    for code in (errno.EACCES, errno.EPERM):
        assert describe_os_error(OSError(code, "denied"), "x.pt") == "no permission to write x.pt"
    assert describe_os_error(OSError(errno.EROFS, "ro"), "x.pt") == \
        "no permission to write x.pt (read-only file system)"
    assert describe_os_error(PermissionError(errno.EACCES, "denied", "/a/b"), action="read") == \
        "no permission to read /a/b"
    assert describe_os_error(OSError(errno.EISDIR, "dir"), "d") == "cannot write d: it is a folder"
    # torch.save into a file object wraps the operating system's error in a RuntimeError
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704")
    except RuntimeError as e:
        assert find_os_error(e).errno == errno.ENOSPC


def test_disk_full_during_fuse_leaves_nothing(tasks, tmp_path, monkeypatch, capsys):
    """ONNX (~1.5 MB) fits in 2 MB, the fused weights do not: no file of the set may remain."""
    out = str(tmp_path / "out")
    os.mkdir(out)
    disk_full(monkeypatch, out, 2_000_000)
    rc = main(_fuse_args(tasks["A"], tasks["base"], out, "onnx", "weights", "pack"))
    err = capsys.readouterr().err
    _one_line(rc, err, f"disk full writing {os.path.join(out, 'w.safetensors')}")
    assert _names(out) == []


def test_disk_full_during_export_leaves_no_onnx_behind(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    os.mkdir(out)
    disk_full(monkeypatch, out, 2_000_000)
    rc = main(["export", "--model", "test_resnet", "--num-classes", "10", "--out",
               os.path.join(out, "base.onnx"), "--save-weights",
               os.path.join(out, "base.safetensors")])
    _one_line(rc, capsys.readouterr().err, "disk full writing", "base.safetensors")
    assert _names(out) == []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ssf_deploy.data import builtin_dataset
    return builtin_dataset(str(tmp_path_factory.mktemp("data") / "builtin"), size=32,
                           train_per_class=2, val_per_class=1)


def _train_args(data, out, *extra):
    return ["train", "--model", "test_resnet", "--data", data, "--image-size", "32",
            "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "10", "--workers",
            "0", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "ck.pt"
    assert main(_train_args(data, out)) == 0
    return str(out)


def test_disk_full_writing_a_checkpoint_says_so_and_keeps_the_old_one(data, trained, tmp_path,
                                                                      monkeypatch, capsys):
    """torch.save's own error is "unexpected pos"; the line must say disk full, and the
    checkpoint being replaced (resume in place) must survive intact."""
    ck = tmp_path / "ck.pt"
    shutil.copy(trained, ck)
    before = ck.read_bytes()
    disk_full(monkeypatch, str(tmp_path), 10_000)
    rc = main(_train_args(data, ck, "--resume", str(ck), "--epochs", "2"))
    _one_line(rc, capsys.readouterr().err, f"disk full writing {ck}")
    assert ck.read_bytes() == before and _names(tmp_path) == ["ck.pt"]


def test_no_room_for_a_checkpoint_is_refused_before_training(data, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(fileio, "_free_bytes", lambda folder: 4096)
    _must_not_run(monkeypatch, "ssf_deploy.train._train_one_epoch")
    rc = main(_train_args(data, tmp_path / "ck.pt"))
    _one_line(rc, capsys.readouterr().err, "disk full writing", "needed, 4,096 bytes free")
    assert _names(tmp_path) == []


def test_an_os_error_escaping_a_command_is_one_line(data, tmp_path, monkeypatch, capsys):
    def no_cache(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/cache/builtin")
    monkeypatch.setattr("ssf_deploy.train._data_dir", no_cache)
    rc = main(_train_args(data, tmp_path / "ck.pt"))
    _one_line(rc, capsys.readouterr().err, "no permission to access /cache/builtin")


# ------------------------------------------------------------------------- 2 no permission

def _ro_case(case, tasks, trained, ro, ok):
    """(argv, the output the error must name, what must not run) for each writing command."""
    f, b = tasks["A"], tasks["base"]
    j = os.path.join
    return {
        "fuse": (["fuse", f, "--base-weights", b, "--out", j(ro, "m.onnx")], j(ro, "m.onnx"),
                 "ssf_deploy.tools.fuse.load_task"),
        "fuse-pack": (["fuse", f, "--base-weights", b, "--out", j(ok, "m.onnx"), "--save-pack",
                       j(ro, "p.safetensors")], j(ro, "p.safetensors"),
                      "ssf_deploy.tools.fuse.load_task"),
        "export": (["export", "--model", "test_resnet", "--num-classes", "5", "--out",
                    j(ro, "b.onnx")], j(ro, "b.onnx"), "ssf_deploy.tools.export.create_base_model"),
        "export-weights": (["export", "--model", "test_resnet", "--num-classes", "5", "--out",
                            j(ok, "b.onnx"), "--save-weights", j(ro, "b.safetensors")],
                           j(ro, "b.safetensors"), "ssf_deploy.tools.export.create_base_model"),
        "train": (["train", "--model", "test_resnet", "--dataset", "builtin", "--out",
                   j(ro, "ck.pt")], j(ro, "ck.pt"), "ssf_deploy.train._data_dir"),
        "train-resume": (["train", "--model", "test_resnet", "--dataset", "builtin", "--resume",
                          trained, "--out", j(ro, "sub", "ck.pt")], j(ro, "sub", "ck.pt"),
                         "ssf_deploy.train._data_dir"),
        "train-resume-in-place": (["train", "--model", "test_resnet", "--dataset", "builtin",
                                   "--resume", j(ro, "old.pt")], j(ro, "old.pt"),
                                  "ssf_deploy.train._data_dir"),
        "engine": (["engine", j(ok, "m.onnx"), "--out", j(ro, "m.plan")], j(ro, "m.plan"),
                   "ssf_deploy.engine.pipeline.load_onnx"),
        "refit": (["refit", j(ok, "m.onnx"), "--pack", j(ok, "p.safetensors"), "--out",
                   j(ro, "r.onnx")], j(ro, "r.onnx"), "ssf_deploy.refit.pipeline.load_onnx"),
        "bundle": (["bundle", f, "--base-weights", b, "--out", j(ro, "t.onnx")],
                   j(ro, "t.onnx"), "ssf_deploy.bundle.build_model"),
        "bench": (["bench", "--method", "ssf", "--model", "test_vit", "--out", j(ro, "b.json")],
                  j(ro, "b.json"), "ssf_deploy.bench.run_bench"),
        "quantize": (["quantize", j(ok, "m.onnx"), "--out", j(ro, "q.onnx")], j(ro, "q.onnx"),
                     "ssf_deploy.quantize.quantize_onnx"),
        "run": (["run", "--workdir", j(ro, "run"), "--no-bench"], j(ro, "run", "model.onnx"),
                "ssf_deploy.data.builtin_dataset"),
    }[case]


@pytest.mark.parametrize("case", ["fuse", "fuse-pack", "export", "export-weights", "train",
                                  "train-resume", "train-resume-in-place", "engine", "refit",
                                  "bundle", "bench", "quantize", "run"])
def test_unwritable_output_is_refused_before_the_work(case, tasks, trained, tmp_path,
                                                      monkeypatch, capsys):
    ro, ok = str(tmp_path / "ro"), str(tmp_path / "ok")
    os.mkdir(ro)
    os.mkdir(ok)
    shutil.copy(trained, os.path.join(ro, "old.pt"))
    argv, named, work = _ro_case(case, tasks, trained, ro, ok)
    read_only(monkeypatch, ro)
    _must_not_run(monkeypatch, work)
    rc = main(argv)
    _one_line(rc, capsys.readouterr().err, f"no permission to write {named}")
    assert _names(ro) == ["old.pt"] and _names(ok) == []


def test_check_writable_refuses_folders_files_in_the_way_and_twice_the_same_output(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="it is a folder"):
        check_writable(str(tmp_path / "d"))
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_writable(str(tmp_path / "f" / "sub" / "m.onnx"))
    with pytest.raises(UsageError, match="two different outputs"):
        check_writable(str(tmp_path / "a.pt"), str(tmp_path / "." / "a.pt"))
    check_writable(str(tmp_path / "new" / "deeper" / "m.onnx"), None)
    assert sorted(os.listdir(tmp_path)) == ["d", "f"]       # the probe creates nothing


def test_builtin_dataset_in_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    from ssf_deploy.data import builtin_dataset
    read_only(monkeypatch, str(tmp_path))
    root = str(tmp_path / "cache" / "builtin")
    with pytest.raises(OutputError, match=f"^no permission to write {root}$"):
        builtin_dataset(root, size=32, train_per_class=1, val_per_class=1)
    assert _names(tmp_path) == []


def test_permission_error_while_writing_names_the_output_not_the_temp_file(tmp_path,
                                                                          monkeypatch):
    real_replace = os.replace

    def deny(src, dst):
        if os.path.basename(dst) == "x.json":
            raise PermissionError(errno.EACCES, "Permission denied", dst)
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", deny)
    with pytest.raises(OutputError, match=r"^no permission to write .*x\.json$"):
        fileio.write_json({"a": 1}, str(tmp_path / "x.json"))
    assert _names(tmp_path) == []


# ------------------------------------------------------------------------------ 3 hard kills

_HOLD = """
    import sys
    from ssf_deploy.fileio import OutputSet
    with OutputSet() as outs:
        with open(outs.add(sys.argv[1]), "w") as f:
            f.write("live writer")
        print("HOLDING", flush=True)
        sys.stdin.readline()
    print("DONE", flush=True)
"""

_KILLED_FUSE = """
    import os, signal, sys
    import ssf_deploy.export as X
    def killed(model, path, **kw):          # kill -9 in the middle of writing the ONNX
        with open(path, "wb") as f:
            f.write(b"half an onnx")
        print("KILLING", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    X.export_onnx = killed
    from ssf_deploy.tools import main
    sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_writers_temp_files_are_removed_a_live_writers_are_not(tasks, tmp_path,
                                                                       capsys):
    out = str(tmp_path / "out")
    os.mkdir(out)
    live = _child(_HOLD, os.path.join(out, "live.txt"))
    killed = _child(_KILLED_FUSE, *_fuse_args(tasks["A"], tasks["base"], out, "onnx",
                                              "weights")[0:])
    try:
        killed.communicate(timeout=300)
        assert killed.returncode == -signal.SIGKILL
        _wait_for(live, "HOLDING")
        orphans = [n for n in _temps(out) if n.startswith(".tmp-m.onnx")]
        holding = [n for n in _temps(out) if n.startswith(".tmp-live.txt")]
        assert orphans and len(holding) == 1, _names(out)
        # the next command that writes into the folder removes the dead writer's temp files...
        assert main(["export", "--model", "test_resnet", "--num-classes", "5", "--out",
                     os.path.join(out, "b.onnx")]) == 0
        assert not [n for n in _temps(out) if n.startswith(".tmp-m.onnx")]
        assert [n for n in _temps(out) if n.startswith(".tmp-live.txt")] == holding  # not live
        live.stdin.write("go\n")
        live.stdin.flush()
        _wait_for(live, "DONE")
        assert live.wait(timeout=60) == 0
    finally:
        for p in (live, killed):
            if p.poll() is None:
                p.kill()
                p.wait()
    capsys.readouterr()
    assert _names(out) == ["b.onnx", "live.txt"]


def test_stale_rule_pid_start_time_machine_and_age(tmp_path):
    pid, machine, start = fileio._owner()
    dead = _a_dead_pid()
    other = "f" * 8 if machine != "f" * 8 else "e" * 8     # another machine's token
    old = 3 * 24 * 3600

    def make(name, age=0.0):
        p = tmp_path / name
        p.write_bytes(b"x")
        if age:
            t = p.stat().st_mtime - age
            os.utime(p, (t, t))
        return name
    keep = [make(f".tmp-a.pt.ssfw{pid}-{machine}-{start}-0123abcd.pt", old),       # me
            make(f".tmp-b.pt.ssfw{dead}-{other}-1-0123abcd.pt"),  # other machine, recent
            make(".tmp-c.pt-abcd1234.pt"),                             # 0.2 name, recent
            make(".tmp-notes.txt", old),                               # not ours
            make("model.onnx", old)]
    gone = [make(f".tmp-d.pt.ssfw{dead}-{machine}-0-0123abcd.pt"),         # dead here
            make(f".tmp-e.pt.ssfw{pid}-{machine}-{start + 1}-0123abcd.pt"),  # pid reused
            make(f".tmp-f.pt.ssfw1-{other}-1-0123abcd.pt", old),  # other machine, old
            make(".tmp-g.onnx-abcd1234.onnx", old),                    # 0.2 orphan, old
            make(".tmp-g.onnx-abcd1234.onnx.data", old)]
    removed = sweep_stale(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(gone)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def _a_dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_interrupted_writes_remove_their_temp_files(tmp_path):
    for exc in (KeyboardInterrupt(), Terminated(), ValueError("writer bug")):
        with pytest.raises(type(exc)):
            with OutputSet() as outs:
                with open(outs.add(str(tmp_path / "sub" / "a.onnx")), "wb") as f:
                    f.write(b"partial")
                outs.add(str(tmp_path / "b.safetensors"))
                raise exc
        assert _names(tmp_path) == []          # the folder it created is gone too


# ------------------------------------------------------------------- 4 outputs as one set

def test_fuse_outputs_are_committed_as_a_set_with_a_manifest(fused_set):
    names = _names(fused_set)
    assert names == ["m.onnx", "m.onnx.manifest.json", "p.safetensors", "w.safetensors"]
    with open(os.path.join(fused_set, "m.onnx.manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == MANIFEST_FORMAT
    assert sorted(manifest["files"]) == ["m.onnx", "p.safetensors", "w.safetensors"]
    for name, entry in manifest["files"].items():
        path = os.path.join(fused_set, name)
        assert entry == {"bytes": os.path.getsize(path), "sha256": fileio.sha256_of(path)}
        check_manifest(path)


class _Killed(BaseException):
    """Stands for kill -9: nothing after it runs in the writer."""


def test_a_kill_between_renames_is_refused_not_mixed(fused_set, tasks, tmp_path, monkeypatch,
                                                     capsys):
    out = str(tmp_path / "set")
    shutil.copytree(fused_set, out)
    real_replace = os.replace
    finals = {os.path.join(out, n) for n in ("m.onnx", "w.safetensors", "p.safetensors")}

    def replace(src, dst):
        real_replace(src, dst)
        if os.path.abspath(dst) in finals:
            raise _Killed()          # task B's ONNX is in place, its weights and pack are not
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        main(_fuse_args(tasks["B"], tasks["base"], out, "onnx", "weights", "pack"))
    monkeypatch.setattr(os, "replace", real_replace)
    capsys.readouterr()
    with open(os.path.join(out, "m.onnx.manifest.json")) as f:
        assert json.load(f) == json.load(open(os.path.join(fused_set, "m.onnx.manifest.json")))
    onnx_path = os.path.join(out, "m.onnx")
    rc = main(["verify", tasks["B"], "--base-weights", tasks["base"], "--onnx", onnx_path])
    _one_line(rc, capsys.readouterr().err, f"{onnx_path} is not the file recorded in "
              "m.onnx.manifest.json", "interrupted")
    rc = main(["refit", onnx_path, "--pack", os.path.join(out, "p.safetensors"),
               "--base-weights", tasks["base"]])
    _one_line(rc, capsys.readouterr().err, "is not the file recorded in m.onnx.manifest.json")
    # the files of the earlier, complete set still read (each on its own)
    assert read_task(os.path.join(out, "p.safetensors")).source == "pack"


def test_writing_one_member_again_retires_the_old_sets_manifest(fused_set, tasks, tmp_path,
                                                                capsys):
    out = str(tmp_path / "set")
    shutil.copytree(fused_set, out)
    assert main(_fuse_args(tasks["B"], tasks["base"], out, "pack")) == 0
    capsys.readouterr()
    assert "m.onnx.manifest.json" not in _names(out)     # that set is broken up on purpose
    check_manifest(os.path.join(out, "p.safetensors"))
    assert read_task(os.path.join(out, "p.safetensors")).source == "pack"


def test_manifest_rules(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.bin", "b.bin", "c.bin"))
    with OutputSet() as outs:
        for p in (a, b):
            with open(outs.add(p), "wb") as f:
                f.write(p.encode())
        with open(outs.add(c, record=False), "wb") as f:      # a cache: committed, not listed
            f.write(b"cache")
    with open(manifest_path(a)) as f:
        assert sorted(json.load(f)["files"]) == ["a.bin", "b.bin"]
    for p in (a, b, c):
        check_manifest(p)
    with open(b, "ab") as f:                                  # changed by hand
        f.write(b"!")
    with pytest.raises(CheckpointError, match="b.bin is not the file recorded in a.bin.manifest"):
        check_manifest(b)
    with atomic_path(c) as tmp:                               # one file: no manifest
        open(tmp, "wb").close()
    assert _names(tmp_path) == ["a.bin", "a.bin.manifest.json", "b.bin", "c.bin"]
    # members in two folders: a manifest next to each, naming the others relative to it
    d, e = str(tmp_path / "x" / "d.onnx"), str(tmp_path / "y" / "e.safetensors")
    with OutputSet() as outs:
        for p in (d, e):
            with open(outs.add(p), "wb") as f:
                f.write(b"member")
        with open(outs.add(str(tmp_path / "z" / "cache.bin"), record=False), "wb") as f:
            f.write(b"cache")
    with open(str(tmp_path / "y" / "d.onnx.manifest.json")) as f:
        assert sorted(json.load(f)["files"]) == [os.path.join("..", "x", "d.onnx"),
                                                 "e.safetensors"]
    assert _names(tmp_path / "x") == ["d.onnx", "d.onnx.manifest.json"]
    assert _names(tmp_path / "z") == ["cache.bin"]
    with open(e, "ab") as f:
        f.write(b"!")
    with pytest.raises(CheckpointError, match="e.safetensors is not the file recorded"):
        check_manifest(e)


def test_engine_plan_and_sidecar_are_one_set(tmp_path):
    from ssf_deploy import engine as E
    plan = str(tmp_path / "m.plan")
    E.write_plan(plan, b"engine", {"x": 1})
    assert _names(tmp_path) == ["m.plan", "m.plan.json", "m.plan.manifest.json"]
    assert E.read_sidecar(plan) == {"x": 1}
    with open(E.sidecar_path(plan), "w") as f:               # another build's sidecar
        json.dump({"x": 2}, f)
    with pytest.raises(CheckpointError, match="m.plan.json is not the file recorded"):
        E.read_sidecar(plan)


# ---------------------------------------------------------------------- 5 malformed values

def _mutate(ck: dict, case: str) -> dict:
    ck = copy.deepcopy(ck)
    ssf = next(k for k in ck["state"] if k.endswith("ssf_scale"))
    if case == "factor-is-a-number":
        ck["state"][ssf] = 1.0
    elif case == "factor-wrong-shape":
        ck["state"][ssf] = torch.ones(3)
    elif case == "state-not-a-dict":
        ck["state"] = [1, 2]
    elif case == "options-not-a-dict":
        ck["options"] = 1.0
    elif case == "kwargs-not-a-dict":
        ck["model_kwargs"] = [1]
    elif case == "num-classes-text":
        ck["num_classes"] = "x"
    elif case == "image-size-text":
        ck["image_size"] = "abc"
    elif case == "arch-number":
        ck["arch"] = 3
    elif case == "probe-number":
        ck["probe"] = 1.0
    elif case == "factor-nan":
        ck["state"][ssf] = ck["state"][ssf].clone()
        ck["state"][ssf][1] = float("nan")
    elif case == "head-inf":
        head = next(k for k in ck["state"] if k.endswith("fc.weight"))
        ck["state"][head] = ck["state"][head].clone()
        ck["state"][head][0, :2] = float("inf")
    elif case == "probe-nan":
        ck["probe"]["logits"] = ck["probe"]["logits"].clone()
        ck["probe"]["logits"][0, 0] = float("nan")
    elif case == "probe-logits-wrong-shape":
        ck["probe"]["logits"] = torch.zeros(4, 3)
    elif case == "base-hash-number":
        ck["base"]["sha256"] = 1.0
    elif case == "plain-state-dict-with-a-number":
        ck = dict(ck["state"], **{ssf: 1.0})
    return ck


MALFORMED = {"factor-is-a-number": "is the float 1.0, not a tensor",
             "factor-wrong-shape": "has shape (3,), model expects",
             "state-not-a-dict": "'state' is not a dict of tensors",
             "options-not-a-dict": "'options' is the float 1.0, expected a dict",
             "kwargs-not-a-dict": "'model_kwargs' is the list [1], expected a dict",
             "num-classes-text": "'num_classes' is the str 'x'",
             "image-size-text": "'image_size' is the str 'abc'",
             "arch-number": "'arch' is the int 3",
             "probe-number": "'probe' is the float 1.0",
             "probe-logits-wrong-shape": "'probe.logits' is a tensor of shape (4, 3)",
             "base-hash-number": "'base.sha256' is the float 1.0",
             "plain-state-dict-with-a-number": "is a float, not a tensor",
             # issue 19: non-finite numbers are bad input, refused naming the tensor and the file
             "factor-nan": "ssf_scale' holds 1 NaN of",
             "head-inf": "fc.weight' holds 2 Inf of",
             "probe-nan": "tensor 'probe.logits' holds 1 NaN of"}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("tool", ["fuse", "verify"])
def test_malformed_values_are_one_line(case, tool, tasks, tmp_path, capsys):
    ck = torch.load(tasks["A"], weights_only=True)
    bad = str(tmp_path / "bad.pt")
    save_checkpoint(_mutate(ck, case), bad)
    argv = [tool, bad, "--base-weights", tasks["base"], "--model", "test_resnet"]
    if tool == "fuse":
        argv += ["--out", str(tmp_path / "m.onnx")]
    rc = main(argv)
    _one_line(rc, capsys.readouterr().err, MALFORMED[case])
    assert _names(tmp_path) == ["bad.pt"]


def test_non_finite_values_are_refused_before_any_work(tasks, fused_set, tmp_path, monkeypatch,
                                                        capsys):
    """Issue 19: a NaN used to fold into every weight it touched and surface as a failed
    comparison (exit 1, a report claiming 100 % top-1 agreement). Checkpoint, pack and base
    weights are refused at load, in one line naming the tensor and the file, exit 2."""
    from ssf_deploy.formats.pack import read_safetensors
    def no_fold(*a, **k):
        raise AssertionError("a task that should have been refused at load was folded")
    monkeypatch.setattr(sys.modules["ssf_deploy.deploy"], "fuse_with_report", no_fold)
    monkeypatch.setattr(sys.modules["ssf_deploy.fuse"], "fuse", no_fold)
    ck = torch.load(tasks["A"], weights_only=True)
    bad = str(tmp_path / "bad.pt")
    save_checkpoint(_mutate(ck, "factor-nan"), bad)
    rc = main(["fuse", bad, "--base-weights", tasks["base"], "--out", str(tmp_path / "m.onnx")])
    line = _one_line(rc, capsys.readouterr().err, bad, "NaN", "refusing non-finite")
    assert "top-1" not in line
    # a pack with an Inf
    state, meta = read_safetensors(os.path.join(fused_set, "p.safetensors"))
    k = next(k for k in state if k.endswith("ssf_shift"))
    state[k] = state[k].clone()
    state[k][0] = float("-inf")
    pack = str(tmp_path / "bad.safetensors")
    save_safetensors(state, pack, metadata=meta)
    rc = main(["verify", "--pack", pack, "--base-weights", tasks["base"]])
    _one_line(rc, capsys.readouterr().err, pack, f"'{k}' holds 1 Inf")
    # base weights with a NaN: refused naming the file, before the base hash is even computed
    from ssf_deploy.formats.pack import read_safetensors as read_st
    base, _ = read_st(tasks["base"])
    w = next(k for k in base if k.endswith("conv1.weight"))
    base[w] = base[w].clone()
    base[w].view(-1)[3] = float("nan")
    nan_base = str(tmp_path / "nanbase.safetensors")
    save_safetensors(base, nan_base)
    rc = main(["fuse", tasks["A"], "--base-weights", nan_base, "--out", str(tmp_path / "m.onnx")])
    _one_line(rc, capsys.readouterr().err, f"base weights {nan_base}", f"'{w}' holds 1 NaN")
    assert _names(tmp_path) == ["bad.pt", "bad.safetensors", "nanbase.safetensors"]


def test_a_non_finite_comparison_fails_in_its_own_words():
    """All-NaN rows all argmax to index 0: they must not count as top-1 agreement."""
    import numpy as np
    from ssf_deploy.verify import compare
    ref = np.array([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0], [0.5, 0.2, 0.1]], dtype=np.float32)
    cand = ref.copy()
    cand[0] = np.nan                     # argmax 0, like ref[1] and ref[2]
    cand[1] = np.nan
    r = compare([ref], [cand], names=["logits"])
    o = r.outputs[0]
    assert not r.passed and r.non_finite and o.non_finite == {"reference": 0, "candidate": 6,
                                                               "rows": 2}
    assert o.top1_agree == pytest.approx(1 / 3) and o.max_abs == 0.0   # the one finite row
    text = str(r)
    assert "FAIL" in text and "NON-FINITE" in text and "candidate holds 6 NaN/Inf" in text
    assert "100.0%" not in text and "33.3%" in text and r.why() == "NaN/Inf in the candidate output"
    json.dumps(r.as_dict(), allow_nan=False)                  # strict JSON: no NaN literals
    everything = ref.copy()
    everything[:] = np.inf
    r = compare([everything], [everything])
    assert not r.passed and r.outputs[0].top1_agree == 0.0
    assert "no row finite on both sides" in str(r) and r.as_dict()["outputs"][0][
        "max_abs_error"] is None
    assert compare([ref], [ref.copy()]).passed                # finite and equal: still a PASS


@pytest.mark.parametrize("field, value, needle", [
    ("extra", "[]", "'extra' is not a JSON object"),
    ("options", "1", "'options' is not a JSON object"),
    ("num_classes", "many", "corrupt pack metadata"),
])
def test_malformed_pack_metadata_is_one_line(fused_set, tasks, tmp_path, field, value, needle,
                                             capsys):
    from ssf_deploy.formats.pack import read_safetensors
    state, meta = read_safetensors(os.path.join(fused_set, "p.safetensors"))
    bad = str(tmp_path / "bad.safetensors")
    save_safetensors(state, bad, metadata=dict(meta, **{field: value}))
    rc = main(["verify", "--pack", bad, "--base-weights", tasks["base"]])
    _one_line(rc, capsys.readouterr().err, needle)


def _resume_case(ck: dict, case: str) -> dict:
    ck = copy.deepcopy(ck)
    opt = ck["optimizer"]
    first = next(iter(opt["state"].values()))
    if case == "moment-wrong-shape":
        first["exp_avg"] = torch.zeros(3, 3)
    elif case == "moment-not-a-tensor":
        first["exp_avg_sq"] = 0.5
    elif case == "step-text":
        first["step"] = "one"
    elif case == "lr-text":
        opt["param_groups"][0]["lr"] = "fast"
    elif case == "groups":
        opt["param_groups"] = opt["param_groups"] * 3
    elif case == "optimizer-not-a-dict":
        ck["optimizer"] = [1]
    elif case == "scheduler-field":
        ck["scheduler"]["t_initial"] = "long"
    elif case == "epoch":
        ck["epoch"] = -1
    elif case == "trainable-state":
        k = next(iter(ck["state"]))
        ck["state"][k] = ck["state"][k].flatten()[:1]
    elif case == "moment-nan":
        first["exp_avg_sq"] = first["exp_avg_sq"].clone()
        first["exp_avg_sq"].view(-1)[0] = float("nan")
    elif case == "state-inf":
        k = next(iter(ck["state"]))
        ck["state"][k] = ck["state"][k].clone()
        ck["state"][k].view(-1)[0] = float("inf")
    return ck


RESUME = {"moment-wrong-shape": "'exp_avg' of", "moment-not-a-tensor": "is a float, not a tensor",
          "step-text": "'step' of", "lr-text": "'lr' is 'fast'",
          "groups": "parameter group(s), this run", "optimizer-not-a-dict": "optimizer state is not",
          "scheduler-field": "scheduler state 't_initial'", "epoch": "'epoch' is -1",
          "trainable-state": "checkpoint does not match the model",
          "moment-nan": "exp_avg_sq' holds 1 NaN", "state-inf": "holds 1 Inf"}


@pytest.mark.parametrize("case", list(RESUME))
def test_malformed_resume_state_is_refused_before_the_first_step(case, data, trained, tmp_path,
                                                                  monkeypatch, capsys):
    bad = str(tmp_path / "bad.pt")
    save_checkpoint(_resume_case(torch.load(trained, weights_only=True), case), bad)
    _must_not_run(monkeypatch, "ssf_deploy.train._train_one_epoch")
    rc = main(_train_args(data, tmp_path / "out.pt", "--resume", bad, "--epochs", "2"))
    _one_line(rc, capsys.readouterr().err, "cannot resume" if case != "trainable-state" else "",
              RESUME[case])
    assert _names(tmp_path) == ["bad.pt"]


# -------------------------------------------------------------------------- 6 early Ctrl-C

_GATE = """
    import sys, time
    class _Gate:                 # holds the first import of {name!r} until a signal comes
        def find_spec(self, fullname, path=None, target=None):
            if fullname == {name!r}:
                sys.meta_path.remove(self)
                print("GATE " + fullname, flush=True)
                time.sleep(300)
            return None
    sys.meta_path.insert(0, _Gate())
"""


def _gate(name: str) -> str:
    return textwrap.dedent(_GATE.format(name=name))


def _signalled(proc: subprocess.Popen, marker: str, sig) -> tuple:
    try:
        _wait_for(proc, marker)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_while_torch_imports_is_one_line(tmp_path):
    """The console script (ssf_deploy_launcher:main) and python -m ssf_deploy, interrupted
    while `import torch` runs (held there by an import hook, so no timing is involved); and
    the CLI's own handling once imported: a SIGINT while a tool module loads, a SIGTERM."""
    script = _gate("torch") + "from ssf_deploy_launcher import main\nsys.exit(main())\n"
    console = _child(script, "params", "--model", "test_vit")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_gate("torch"))
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    dash_m = subprocess.Popen([sys.executable, "-m", "ssf_deploy", "params"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_default_sigint)
    later = _gate("ssf_deploy.tools.params") + "from ssf_deploy_launcher import main\n" \
        "sys.exit(main())\n"
    sigint = _child(later, "params")
    sigterm = _child(later, "params")
    results = {name: _signalled(p, "GATE", sig) for name, p, sig in (
        ("console script", console, signal.SIGINT), ("python -m", dash_m, signal.SIGINT),
        ("after import", sigint, signal.SIGINT), ("terminated", sigterm, signal.SIGTERM))}
    for name in ("console script", "python -m", "after import"):
        rc, err = results[name]
        _one_line(rc, err, "error: interrupted", code=130)
    rc, err = results["terminated"]
    _one_line(rc, err, "error: terminated", code=143)


def test_the_launcher_is_the_console_script_and_guards_only_cli_runs(monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["scripts"]["ssf-deploy"] == "ssf_deploy_launcher:main"
    assert "ssf_deploy_launcher" in project["tool"]["setuptools"]["py-modules"]
    import ssf_deploy_launcher as L
    from ssf_deploy.errors import EXIT_INTERRUPTED
    assert L.EXIT_INTERRUPTED == EXIT_INTERRUPTED
    py = sys.executable
    for orig, expected in ((["-m", "ssf_deploy", "fuse"], True),
                           (["-X", "utf8", "-m", "ssf_deploy.tools.train"], True),
                           (["-mssf_deploy.tools"], True),
                           (["-m", "ssf_deploy.bench", "{}"], False),
                           (["-m", "pytest"], False), (["-c", "import ssf_deploy"], False)):
        monkeypatch.setattr(sys, "argv", ["-m"])
        monkeypatch.setattr(sys, "orig_argv", [py, *orig])
        assert L.cli_module_being_run() is expected, orig
    monkeypatch.setattr(sys, "argv", ["/usr/bin/ssf-deploy"])
    assert not L.cli_module_being_run()


# -------------------------------------------------------------------------- 7 same bytes

def test_safetensors_checkpoints_and_onnx_are_byte_identical_for_the_same_content(tmp_path):
    t = {"b": torch.randn(3, 4), "a": torch.arange(5), "h": torch.randn(2).half()}
    meta = {f"k{i}": str(i) for i in range(12)}
    save_safetensors(t, str(tmp_path / "1.safetensors"), metadata=meta)
    save_safetensors(dict(reversed(list(t.items()))), str(tmp_path / "2.safetensors"),
                     metadata=dict(reversed(list(meta.items()))))
    one = (tmp_path / "1.safetensors").read_bytes()
    assert one == (tmp_path / "2.safetensors").read_bytes()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "1.safetensors"), "pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), t[k]) for k in t)

    obj = {"state": {"w": torch.randn(4)}, "epoch": 3, "args": {"lr": 0.1}}
    save_checkpoint(obj, str(tmp_path / "x.pt"))
    save_checkpoint(obj, str(tmp_path / "other-name.pt"))     # temp names differ too
    assert (tmp_path / "x.pt").read_bytes() == (tmp_path / "other-name.pt").read_bytes()

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    x = torch.randn(1, 3, 2, 2)
    export_onnx(model, str(tmp_path / "a.onnx"), example=x, metadata={"arch": "m", "z": 1})
    export_onnx(model, str(tmp_path / "b.onnx"), example=x, metadata={"z": 1, "arch": "m"})
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    keys = [p.key for p in onnx.load(str(tmp_path / "a.onnx")).metadata_props]
    # one fixed order: onnxsim's own keys as it writes them, then ours (appended, sorted)
    ours = [k for k in keys if k.startswith("ssf_deploy.")]
    assert ours == sorted(ours) and keys[-len(ours):] == ours and len(set(keys)) == len(keys)
    assert all(k.startswith("onnxsim.") for k in keys[:-len(ours)])


def test_two_fuse_runs_write_the_same_bytes(fused_set, tasks, tmp_path, capsys):
    again = str(tmp_path / "again")
    assert main(_fuse_args(tasks["A"], tasks["base"], again, "onnx", "weights", "pack")) == 0
    capsys.readouterr()
    assert _names(again) == _names(fused_set)
    for name in _names(fused_set):
        with open(os.path.join(fused_set, name), "rb") as a, \
                open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
