"""TensorRT and Polygraphy: lazy imports, the CUDA device, and Polygraphy's failures as one line.

TensorRT is optional (``pip install "ssf-deploy[tensorrt]"``, which brings Polygraphy along):
without it every other tool works and the TensorRT paths fail with one line naming the extra.
Polygraphy's loaders log through its ``G_LOGGER`` (TensorRT's own log included, see
``polygraphy.backend.trt.util.get_trt_logger``), which prints to stdout; inside
:func:`polygraphy_scope` that goes to stderr (``--json`` stays parseable) and a
``PolygraphyException`` becomes an :class:`SSFDeployError` naming the last error logged.
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import Optional

import torch

from ..errors import SSFDeployError, UsageError, first_line

__all__ = ["TRT_MISSING", "import_tensorrt", "import_polygraphy", "trt_version", "version_text",
           "has_flag", "cuda_device", "device_scope", "require_cuda", "polygraphy_scope"]

TRT_MISSING = ('TensorRT is not installed: pip install "ssf-deploy[tensorrt]" '
               '(needs an NVIDIA GPU and driver)')


def import_tensorrt():
    """``import tensorrt`` or one clear line (also when ``sys.modules['tensorrt'] is None``)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise SSFDeployError(TRT_MISSING) from e
    except Exception as e:   # a broken install, e.g. libnvinfer not found
        raise SSFDeployError(f"TensorRT is installed but cannot be imported ({first_line(e)}): "
                             f'reinstall with pip install "ssf-deploy[tensorrt]"') from e
    v = trt_version(trt)
    if v is not None and v[0] < 10:
        raise SSFDeployError(f"TensorRT {trt.__version__} is too old: ssf-deploy needs TensorRT "
                             f'10.x or 11.x (pip install "ssf-deploy[tensorrt]")')
    return trt


def import_polygraphy():
    """``polygraphy.backend.trt`` (its TensorRT import is lazy), or one line naming the extra."""
    try:
        from polygraphy.backend import trt as poly
    except ImportError as e:
        raise SSFDeployError('Polygraphy is not installed: pip install "ssf-deploy[tensorrt]"'
                             ) from e
    return poly


def trt_version(trt) -> Optional[tuple]:
    """(major, minor) of the TensorRT module, None when its version string does not say."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(getattr(trt, "__version__", "")))
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_text(trt) -> str:
    return str(getattr(trt, "__version__", "?"))


def has_flag(trt, name: str) -> bool:
    return hasattr(getattr(trt, "BuilderFlag", None), name)


def cuda_device(device=None) -> torch.device:
    """``None``/``"cuda"`` (the current device), ``"cuda:N"``, ``N`` or a torch.device, as a
    torch.device. Checks the spelling only; :func:`require_cuda` checks that it exists."""
    if device is None:
        return torch.device("cuda")
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise UsageError(f"`device` index must be >= 0, got {device}")
        return torch.device("cuda", device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"unknown `device` {device!r}: use cuda or cuda:N") from e
    if dev.type != "cuda":
        raise UsageError(f"TensorRT runs on an NVIDIA GPU, not on '{device}': use cuda or cuda:N")
    return dev


def device_scope(device: Optional[torch.device]):
    """``torch.cuda.device(N)`` for an indexed device; otherwise the current device stays.
    Polygraphy allocates on the current device, so every TensorRT call runs inside this."""
    if device is None or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def require_cuda(device=None) -> torch.device:
    dev = cuda_device(device)
    if not torch.cuda.is_available():
        raise SSFDeployError("TensorRT needs an NVIDIA GPU with CUDA, and torch sees none "
                             "(torch.cuda.is_available() is False)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SSFDeployError(f"device '{dev}' does not exist ({torch.cuda.device_count()} CUDA "
                             f"device(s))")
    return dev


class _Log(io.TextIOBase):
    """Polygraphy's output passed on to stderr line by line, keeping its error lines for a
    one-line failure; its critical lines ("[!]", about to be raised) are kept, not printed, so
    the failure is said once."""

    def __init__(self, out):
        self.out, self.error_lines, self.critical, self._part = out, [], [], ""

    def write(self, text: str) -> int:
        self._part += text
        *lines, self._part = self._part.split("\n")
        for ln in lines:
            if ln.startswith("[!] "):
                self.critical.append(ln[4:].strip())
                continue
            if ln.startswith("[E] "):
                self.error_lines.append(ln[4:].strip())
            self.out.write(ln + "\n")
        return len(text)

    def flush(self) -> None:
        if self._part:
            self.out.write(self._part)
            self._part = ""
        self.out.flush()

    def last_error(self) -> str:
        """TensorRT's own last error when it logged one (more precise than Polygraphy's
        summary), else Polygraphy's critical message."""
        rows = [e for e in self.error_lines if e] or [c for c in self.critical if c]
        return rows[-1] if rows else ""


@contextlib.contextmanager
def polygraphy_scope(failure: str, *, verbose: bool = False):
    """Polygraphy (and TensorRT's log through it) on stderr, warnings and errors (``verbose``:
    TensorRT's INFO too); a ``PolygraphyException`` becomes one line: ``failure: <last error>``.
    Yields the log (its ``last_error()`` for failures the caller raises itself)."""
    import_polygraphy()          # the one-line error when it is missing
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER
    log = _Log(sys.stderr)          # the stderr of the caller, before the redirect
    saved = (G_LOGGER.module_severity, G_LOGGER.colors)
    G_LOGGER.module_severity = G_LOGGER.VERBOSE if verbose else G_LOGGER.WARNING
    G_LOGGER.colors = False
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield log
    except PolygraphyException as e:
        why = log.last_error() or first_line(e)
        raise SSFDeployError(f"{failure}: {why.splitlines()[0] if why else 'see the log above'}"
                             ) from e
    finally:
        log.flush()
        G_LOGGER.module_severity, G_LOGGER.colors = saved
