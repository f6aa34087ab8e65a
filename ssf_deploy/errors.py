"""Every user-facing failure is an :class:`SSFDeployError`, explained in one line.

Exit codes (the CLI maps them, callers can rely on them):

* **1** — a check ran and failed (:class:`VerificationError`): outputs differ, a threshold was
  missed. The input was fine; the result is not.
* **2** — usage or bad input (every other subclass): a corrupt or foreign checkpoint, a base that
  is not the one trained on, a model that cannot be fused exactly, a missing dependency.
* **130** — interrupted (Ctrl-C); **143** — terminated (SIGTERM, CLI only).

The subclasses let callers tell "unfusable" from "corrupt" without parsing messages. Operating
system errors are described in one place (:func:`describe_os_error`): "disk full writing X",
"no permission to write X", never a bare errno or a traceback.
"""
from __future__ import annotations

import errno
import os
from typing import Optional

__all__ = ["SSFDeployError", "UsageError", "CheckpointError", "BaseMismatchError", "FuseError",
           "VerificationError", "OutputError", "first_line", "describe_os_error", "find_os_error",
           "DISK_FULL", "NO_PERMISSION", "Terminated", "EXIT_CHECK_FAILED",
           "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143      # 128 + SIGTERM


class SSFDeployError(Exception):
    """A problem with the user's input or environment, explained in one line."""
    exit_code = EXIT_BAD_INPUT


class UsageError(SSFDeployError):
    """Options that contradict each other or are out of range."""


class CheckpointError(SSFDeployError):
    """A checkpoint, pack or weights file that cannot be read or does not fit the model."""


class BaseMismatchError(CheckpointError):
    """The base weights are not the ones the task was trained on (hash or keys differ)."""


class FuseError(SSFDeployError):
    """The tuned model cannot be folded into the base architecture exactly."""


class OutputError(SSFDeployError):
    """An output cannot be written: disk full, no permission, a folder in the way. Raised before
    the work where it can be foreseen (:func:`ssf_deploy.fileio.check_writable`), and instead of
    the writer's own error when it happens while writing; nothing is left at the output path."""


class VerificationError(SSFDeployError):
    """A comparison ran and failed: the artefact does not match its reference."""
    exit_code = EXIT_CHECK_FAILED

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's handler so that cleanup runs as for Ctrl-C (temp files are
    removed, nothing half-written is left) before it exits 143."""


def first_line(exc: BaseException) -> str:
    """The whole first non-empty line of an exception's message, or its type name if it has none.

    Never cut mid-sentence: a message is only useful whole.
    """
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


DISK_FULL = frozenset(c for c in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if c is not None)
NO_PERMISSION = frozenset((errno.EACCES, errno.EPERM, errno.EROFS))


def describe_os_error(exc: OSError, path: Optional[str] = None, *,
                      action: Optional[str] = "write") -> str:
    """One line naming the cause and the file, for any ``OSError``.

    ``action`` is ``"write"`` or ``"read"`` when the caller knows what it was doing with
    ``path`` (default: the error's own filename), ``None`` when it does not.
    """
    code = exc.errno
    target = os.fspath(path) if path is not None else (exc.filename if exc.filename else None)
    where = f" {target}" if target else ""
    if code in DISK_FULL:
        quota = " (disk quota exceeded)" if code != errno.ENOSPC else ""
        return f"disk full writing{where or ' an output'}{quota}"
    if code in NO_PERMISSION:
        verb = action or "access"
        ro = " (read-only file system)" if code == errno.EROFS else ""
        return f"no permission to {verb}{where or ' a file'}{ro}"
    verb = f"cannot {action}{where}" if action else (f"cannot use{where}" if target else "error")
    reason = {
        errno.ENOENT: "not found" if action != "write" else "its folder does not exist",
        errno.EISDIR: "it is a folder",
        errno.ENOTDIR: "a part of its path is a file, not a folder",
        errno.ENAMETOOLONG: "file name too long",
        errno.EFBIG: "file too large for the file system",
        errno.EIO: "input/output error (failing disk or lost network file system?)",
        errno.EMFILE: "too many open files",
        errno.ENFILE: "too many open files",
    }.get(code, exc.strerror or first_line(exc))
    return f"{verb}: {reason}"


def find_os_error(exc: Optional[BaseException]) -> Optional[OSError]:
    """The ``OSError`` behind ``exc``: itself or one it was raised from or while handling.

    Some writers wrap the operating system's error (``torch.save`` into a file object raises a
    ``RuntimeError`` "unexpected pos" while handling the ``OSError(ENOSPC)``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
