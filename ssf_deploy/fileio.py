"""Writing outputs: never half-written, committed as a set, checked before the work, no orphans.

* **Atomic, as a set.** Every file ssf-deploy writes goes to a temp file next to its target and
  is renamed into place only when the whole job succeeded. A command that writes several files
  (``fuse --out --save-weights --save-pack``, ``export --save-weights``, an engine and its
  sidecar) commits them through one :class:`OutputSet`: all temp files are written and flushed to
  disk first, then renamed one after another, then a manifest ``<first output>.manifest.json``
  recording every member's size and sha256 is written last. A kill between two renames can
  leave new and old files side by side, but never unnoticed: readers check a file against a
  manifest next to it that lists it (:func:`check_manifest`) and refuse a mismatch in one line.
  Replacing a file retires (removes) any *other* manifest that listed it, so a set that was
  deliberately broken up is not mistaken for an interrupted one.
* **Checked before the work.** :func:`check_writable` is called by every command that writes,
  before the expensive part: a folder in the way, no permission, no space at all are refused
  in one line instead of after an epoch of training.
* **One message per cause.** Operating system errors while writing become
  :class:`~ssf_deploy.errors.OutputError` with :func:`~ssf_deploy.errors.describe_os_error`'s
  line ("disk full writing X", "no permission to write X"), and the temp files are removed.
* **No orphans.** Temp files are named ``.tmp-<target>.ssfw<pid>-<host>-<start>-<random><ext>``:
  the writer's process id, a token for the machine (host name, boot id, pid namespace) and the
  process start time. A writer that was killed (``kill -9``) cannot remove its temp files, so
  every write first sweeps its folder (:func:`sweep_stale`): a temp file of this machine whose
  process is gone (or whose pid now belongs to a younger process) is removed at once; one of
  another machine (a shared network folder) only when it is older than :data:`STALE_AFTER_S`.
  A live writer's temp files are never touched, so two runs can write into one folder at once.

:func:`plain` reduces metadata to the containers both ``torch.load(weights_only=True)`` and JSON
accept. Same content, same bytes: :func:`save_safetensors` writes its header (metadata included)
in sorted order, manifests and JSON are written with sorted keys.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from .errors import (DISK_FULL, NO_PERMISSION, CheckpointError, OutputError, SSFDeployError,
                     UsageError, describe_os_error, find_os_error)

__all__ = ["atomic_path", "scratch_path", "OutputSet", "check_writable", "sweep_stale",
           "check_manifest",
           "manifest_path", "plain", "save_safetensors", "write_json", "sha256_of", "TMP_PREFIX",
           "MANIFEST_SUFFIX", "MANIFEST_FORMAT", "STALE_AFTER_S"]

TMP_PREFIX = ".tmp-"
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "ssf-deploy/manifest/1"
STALE_AFTER_S = 24 * 3600    # temp files of another machine: removed once this old

_MARK = ".ssfw"
_OWNER_RE = re.compile(r"\.ssfw(\d+)-([0-9a-f]{8})-(\d+)-[0-9a-f]{8}")
_LEGACY_RE = re.compile(r"^\.tmp-(.+)-[a-z0-9_]{8}(.*)$")   # ssf-deploy <= 0.2 (mkstemp names)
_BASE_CHARS = 80             # of the target's name kept in a temp name (NAME_MAX is 255)
# errors that mean "this output cannot be written" (not "the writer has a bug")
_WRITE_ERRNOS = DISK_FULL | NO_PERMISSION | {errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG,
                                             errno.EFBIG, errno.EIO}


def plain(x: Any) -> Any:
    """Reduce to containers ``torch.load(weights_only=True)`` and JSON both accept.

    Tuples become lists, dict keys strings, one-element tensors numbers, anything else its str().
    """
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return str(x)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# ------------------------------------------------------------------------------- temp files

def _proc_stat(pid: int) -> Optional[list]:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ..., starttime at index 19); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return data[data.rindex(b")") + 2:].split()
    except ValueError:
        return None


def _start_ticks(pid: int) -> int:
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else 0
    except (IndexError, ValueError):
        return 0


_owner_cache: dict = {}


def _machine_token() -> str:
    """Same on every process of this machine and pid namespace, different elsewhere."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        pass     # not Linux: the host name and pid namespace still tell machines apart
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass     # no pid namespaces here: one namespace, nothing to tell apart
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def _owner() -> tuple[int, str, int]:
    """(pid, machine token, process start) of this process (recomputed after a fork)."""
    pid = os.getpid()
    if _owner_cache.get("pid") != pid:
        _owner_cache.update(pid=pid, owner=(pid, _machine_token(), _start_ticks(pid)))
    return _owner_cache["owner"]


def _alive(pid: int, start: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":              # os.kill(pid, 0) would send CTRL_C_EVENT there
        return True
    if pid == os.getpid():
        return start in (0, _owner()[2])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                         # exists, belongs to someone else
    except OSError:
        return True                  # cannot tell: keep its files
    fields = _proc_stat(pid)
    if fields is None:
        return not os.path.isdir("/proc/self")   # no /proc: trust kill(0)
    if fields[0] == b"Z":
        return False                 # a zombie writes nothing
    if start:
        try:
            return int(fields[19]) == start      # else the pid was reused by a younger process
        except (IndexError, ValueError):
            return True
    return True


def _temp_name(target: str, suffix: str) -> str:
    pid, machine, start = _owner()
    return (f"{TMP_PREFIX}{os.path.basename(target)[:_BASE_CHARS]}{_MARK}{pid}-{machine}-{start}-"
            f"{secrets.token_hex(4)}{suffix}")


def _make_temp(folder: str, target: str, suffix: str) -> str:
    for _ in range(100):
        tmp = os.path.join(folder, _temp_name(target, suffix))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no unused temp file name", folder)


def _is_stale(name: str, mtime: float, now: float) -> bool:
    found = list(_OWNER_RE.finditer(name))
    if found:    # the last marker is the writer of this file (a temp of a temp holds two)
        pid, machine, start = found[-1].groups()
        if machine == _owner()[1] and os.name != "nt":
            return not _alive(int(pid), int(start))
        return now - mtime > STALE_AFTER_S
    legacy = _LEGACY_RE.match(name)
    if legacy:   # no owner recorded: only by age
        ext = os.path.splitext(legacy.group(1))[1]
        return legacy.group(2) in (ext, ext + ".data") and now - mtime > STALE_AFTER_S
    return False


def sweep_stale(folder: str) -> list[str]:
    """Remove the temp files a killed writer left in ``folder``; returns what was removed.

    Only plain files named like ours are considered; see the module docstring for the rule.
    """
    removed: list[str] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and _is_stale(entry.name, st.st_mtime, now):
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except OSError:          # gone already (another sweeper), or not ours to remove
                pass
    return removed


# ------------------------------------------------------------------------------- pre-flight

def _free_bytes(folder: str) -> Optional[int]:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    if not st.f_blocks:              # a file system that does not report its size
        return None
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e7 else f"{n:,} bytes"


def check_writable(*paths: Optional[str], need: Optional[dict] = None) -> None:
    """Refuse now, in one line, what would make writing ``paths`` fail later.

    For every path (``None`` is skipped): it is not a folder, its nearest existing ancestor is a
    folder in which this process can create a file (tried for real, so read-only file systems,
    ACLs and root squash count), and that file system is not full: at least ``need[path]``
    bytes are free when given (a lower bound of the output's size), else at least one byte.
    Creates nothing that stays (not even missing folders); removes stale temp files it meets.
    Raises :class:`~ssf_deploy.errors.OutputError`.
    """
    need = need or {}
    per_device: dict = {}
    seen: dict = {}
    for p in paths:
        if p is None or p == "":
            continue
        path = os.fspath(p)
        full = os.path.abspath(path)
        if full in seen:
            raise UsageError(f"{path} is given as two different outputs")
        seen[full] = path
        if os.path.isdir(full):
            raise OutputError(f"cannot write {path}: it is a folder")
        folder = os.path.dirname(full)
        existing = folder
        while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise OutputError(f"cannot write {path}: {existing} is a file, not a folder")
        if existing == folder:
            sweep_stale(folder)
        try:
            probe = _make_temp(existing, full, ".probe")
        except OSError as e:
            raise OutputError(describe_os_error(e, path)) from e
        try:
            os.unlink(probe)
        except OSError:
            pass     # a probe left behind is a stale temp file: the next sweep removes it
        free = _free_bytes(existing)
        if free is None:
            continue
        dev = os.stat(existing).st_dev
        total = per_device.get(dev, 0) + max(int(need.get(p, need.get(path, 0)) or 0), 1)
        per_device[dev] = total
        if free < total:
            raise OutputError(f"disk full writing {path}: about {_mb(total)} needed, "
                              f"{_mb(free)} free in {existing}" if total > 1 else
                              f"disk full writing {path}: no space left in {existing}")


# ------------------------------------------------------------------------------- output sets

def manifest_path(primary: str) -> str:
    """Where the manifest of a set whose first output is ``primary`` lives (next to it)."""
    return os.fspath(primary) + MANIFEST_SUFFIX


_hash_cache: dict = {}


def sha256_of(path: str) -> str:
    """Hex sha256 of a file's bytes (cached per path, size, mtime and inode)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return               # some platforms cannot open a folder: best effort
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno in DISK_FULL or e.errno == errno.EIO:
            raise
    finally:
        os.close(fd)


def _read_manifest(path: str) -> Optional[dict]:
    try:
        if os.path.getsize(path) > 1 << 22:
            return None
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or \
            not isinstance(data.get("files"), dict):
        return None
    return data


def _manifests_in(folder: str) -> list[str]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in sorted(names)
            if n.endswith(MANIFEST_SUFFIX) and not n.startswith(TMP_PREFIX)]


def _listed(manifest: dict, folder: str, target: str) -> Optional[dict]:
    for rel, entry in manifest["files"].items():
        if isinstance(rel, str) and isinstance(entry, dict) and \
                os.path.abspath(os.path.join(folder, rel)) == target:
            return entry
    return None


_shown: dict = {}     # temp path of a set being written -> the output it becomes


@dataclass
class _Member:
    path: str           # as the caller spelled it (for messages)
    full: str           # absolute
    tmp: str
    record: bool        # listed in the manifest (caches are not)


class OutputSet:
    """Outputs written together and committed as a set (see the module docstring).

    ::

        with OutputSet() as outs:
            export_onnx(fused, outs.add("model.onnx"), ...)
            save_safetensors(state, outs.add("fused.safetensors"))
        # both in place, then model.onnx.manifest.json; on any error neither (nor a temp file)

    ``add(path)`` returns the temp path to write; ``record=False`` members (caches) are
    committed with the set but not listed in its manifest. A set with fewer than two recorded
    members writes no manifest. Operating system errors become
    :class:`~ssf_deploy.errors.OutputError` naming the output, not the temp file.
    """

    def __init__(self, manifest: bool = True):
        self._manifest = manifest
        self._members: list[_Member] = []
        self._made_dirs: list[str] = []
        self._swept: set = set()

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self._members]

    def add(self, path: str, suffix: Optional[str] = None, record: bool = True) -> str:
        full = os.path.abspath(os.fspath(path))
        # a writer handed the temp file of an enclosing set names that set's output in errors
        path = _shown.get(full, os.fspath(path))
        if any(m.full == full for m in self._members):
            raise UsageError(f"{path} is given as two different outputs")
        folder = os.path.dirname(full)
        try:
            self._makedirs(folder)
            if folder not in self._swept:
                self._swept.add(folder)
                sweep_stale(folder)
            tmp = _make_temp(folder, full, suffix if suffix is not None
                             else os.path.splitext(full)[1])
        except OSError as e:
            raise OutputError(describe_os_error(e, path)) from e
        self._members.append(_Member(path, full, tmp, record))
        _shown[tmp] = path
        return tmp

    def _makedirs(self, folder: str) -> None:
        missing = []
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            missing.append(folder)
            folder = os.path.dirname(folder)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise
                continue
            self._made_dirs.append(d)

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            try:
                self.commit()
            except BaseException as e:
                self.abort()
                mapped = self._mapped(e)
                if mapped is not None:
                    raise mapped from e
                raise
            return False
        self.abort()
        mapped = self._mapped(exc)
        if mapped is not None:
            raise mapped from exc
        return False

    # -- failure

    def abort(self) -> None:
        """Remove every temp file (and folders this set created that are still empty)."""
        for m in self._members:
            _shown.pop(m.tmp, None)
            for p in (m.tmp, m.tmp + ".data"):   # .data: an ONNX writer's external data
                try:
                    os.unlink(p)
                except OSError:
                    pass
        for d in reversed(self._made_dirs):
            try:
                os.rmdir(d)
            except OSError:
                pass
        self._made_dirs = []

    def _mapped(self, exc: BaseException) -> Optional[OutputError]:
        """The one-line error for an operating system failure while writing, else None."""
        if not isinstance(exc, Exception) or isinstance(exc, SSFDeployError) or \
                not self._members:
            return None
        os_err = find_os_error(exc)
        if os_err is None or os_err.errno not in _WRITE_ERRNOS:
            return None
        member = self._members[-1]     # the one being written when it failed
        if os_err.filename:
            name = os.path.abspath(os.fspath(os_err.filename))
            hit = [m for m in self._members
                   if name in (m.full, os.path.abspath(m.tmp), os.path.dirname(m.full))
                   or name.startswith(os.path.abspath(m.tmp))]
            if hit:
                member = hit[0]
            elif os_err.errno not in DISK_FULL:
                return None            # about another file (an input): not ours to explain
        return OutputError(describe_os_error(os_err, member.path))

    # -- success

    def commit(self) -> None:
        """Flush every temp file to disk, rename them into place, then write the manifest."""
        recorded = [m for m in self._members if m.record]
        with_manifest = self._manifest and len(recorded) >= 2
        entries: dict = {}
        for m in self._members:
            step = m
            try:
                if not os.path.isfile(m.tmp):
                    raise OutputError(f"cannot write {m.path}: its writer left no file")
                _fsync(m.tmp)      # a delayed ENOSPC/EIO surfaces here, before any rename
                os.chmod(m.tmp, _default_mode())
                if with_manifest and m.record:
                    entries[m.full] = {"bytes": os.path.getsize(m.tmp), "sha256": sha256_of(m.tmp)}
            except OSError as e:
                raise OutputError(describe_os_error(e, step.path)) from e
        folders = sorted({os.path.dirname(m.full) for m in self._members})
        own = {os.path.join(f, os.path.basename(manifest_path(recorded[0].full)))
               for f in folders} if with_manifest else set()
        self._retire(own)
        for m in self._members:
            try:
                os.replace(m.tmp, m.full)
            except OSError as e:
                raise OutputError(describe_os_error(e, m.path)) from e
            _shown.pop(m.tmp, None)
        for f in folders:
            _fsync(f, directory=True)
        self._made_dirs = []
        if with_manifest:   # next to every listed member, so each one's reader finds it
            self._write_manifests(recorded[0], entries,
                                  sorted({os.path.dirname(m.full) for m in recorded}))

    def _retire(self, keep: set) -> None:
        """Remove other manifests that list a file this set replaces: that set is broken up on
        purpose, so its manifest must not make readers refuse the new file."""
        targets = {m.full for m in self._members}
        for folder in sorted({os.path.dirname(t) for t in targets}):
            for path in _manifests_in(folder):
                if path in keep or path in targets:
                    continue
                data = _read_manifest(path)
                if data is not None and any(_listed(data, folder, t) for t in targets):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass

    def _write_manifests(self, primary: _Member, entries: dict, folders: list) -> None:
        name = os.path.basename(manifest_path(primary.full))
        for folder in folders:
            body = {"format": MANIFEST_FORMAT,
                    "files": {os.path.relpath(full, folder): entry
                              for full, entry in entries.items()}}
            target = os.path.join(folder, name)
            try:
                tmp = _make_temp(folder, target, ".json")
                try:
                    with open(tmp, "w", encoding="utf-8") as f:
                        json.dump(body, f, indent=1, sort_keys=True)
                        f.write("\n")
                    _fsync(tmp)
                    os.chmod(tmp, _default_mode())
                    os.replace(tmp, target)
                except BaseException:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                    raise
            except OSError as e:
                raise OutputError(describe_os_error(e, target)) from e
            _fsync(folder, directory=True)


@contextmanager
def atomic_path(path: str, suffix: Optional[str] = None) -> Iterator[str]:
    """Yield a temp path in the target's folder; rename onto ``path`` only if the block succeeds.

    A one-member :class:`OutputSet`. The result gets the permissions ``open()`` would give it,
    whatever wrote the temp file (``mkstemp``-style temp files are 0600, and some writers
    replace the file they are given).
    """
    with OutputSet() as outs:
        yield outs.add(path, suffix)


@contextmanager
def scratch_path(near: str, suffix: str = "") -> Iterator[str]:
    """A temp file next to ``near`` for an intermediate result, removed at the end whatever
    happens. Named like every temp file, so a killed writer's is swept; next to the output, so a
    file too large to copy through memory goes where the output will (its disk, its checks)."""
    full = os.path.abspath(os.fspath(near))
    tmp = _make_temp(os.path.dirname(full), full, suffix)
    try:
        yield tmp
    finally:
        for p in (tmp, tmp + ".data"):
            try:
                os.unlink(p)
            except OSError:
                pass


def check_manifest(path: str) -> None:
    """Refuse ``path`` if a manifest next to it lists it with other content.

    That happens when the run that wrote the set was killed between two renames (new and old
    files side by side) or a member was changed by hand. Files no manifest lists are accepted;
    a file listed by several manifests must match one of them. Raises
    :class:`~ssf_deploy.errors.CheckpointError`.
    """
    full = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(full)
    listing = []
    for mpath in _manifests_in(folder):
        if mpath == full:
            continue
        data = _read_manifest(mpath)
        entry = _listed(data, folder, full) if data is not None else None
        if entry is not None:
            listing.append((mpath, entry))
    if not listing:
        return
    try:
        size = os.path.getsize(full)
        for _, entry in listing:
            if entry.get("bytes") == size and entry.get("sha256") == sha256_of(full):
                return
    except OSError:
        return                          # the reader will say what is wrong with the file
    raise CheckpointError(
        f"{path} is not the file recorded in {os.path.basename(listing[0][0])} next to it "
        f"(sha256 differs): the run that wrote that set of outputs was interrupted before all "
        f"of them were in place, or the file was changed since; rerun the command that wrote "
        f"them")


# ------------------------------------------------------------------------------- writers

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


def _write_safetensors(tensors: dict, f, metadata: Optional[dict]) -> None:
    """The safetensors format, in a fixed order: tensors by name, header keys sorted."""
    header: dict = {}
    data = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"safetensors holds str -> tensor, got {name!r}: {type(t).__name__}")
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"safetensors cannot store {name} of dtype {t.dtype}")
        t = t.detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        data.append(t)
        offset += size
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata holds str -> str, got {bad[0]!r}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)          # the data starts 8-byte aligned
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for t in data:
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    """A safetensors file through :func:`atomic_path`; same tensors and metadata, same bytes
    (``safetensors.torch.save_file`` writes its metadata in a different order every time)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _write_safetensors(tensors, f, metadata)


def write_json(obj: Any, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
