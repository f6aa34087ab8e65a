"""A client for ``ssf-deploy serve``: images as ``.npy``, one task name per request, bounded
timeouts (a dead server is an error within ``timeout`` seconds, never a hang).

For a Triton server running the repository, use ``tritonclient`` with the task table from the
model's config (:func:`ssf_deploy.serve.repo.tasks_of_config`): inputs ``images`` float32
``[n,3,H,W]`` and ``task`` int64 ``[n,1]``, output ``logits`` (trim each row to its task's
``num_classes``).
"""
from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from typing import Optional

import numpy as np

__all__ = ["ServeClient", "ServeError"]


class ServeError(Exception):
    """The server refused a request (``status`` is its HTTP code) or could not be reached
    (``status`` is None)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class ServeClient:
    def __init__(self, url: str, model: str, *, timeout: float = 30.0):
        self.base = url.rstrip("/") + "/" + model
        self.model = model
        self.timeout = float(timeout)

    def _call(self, method: str, path: str, body: Optional[bytes] = None,
              ctype: Optional[str] = None, timeout: Optional[float] = None) -> dict:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw).get("error") or raw.decode(errors="replace")
            except ValueError:
                msg = raw.decode(errors="replace").strip() or e.reason
            raise ServeError(str(msg), e.code) from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise ServeError(f"{self.base}: {reason}", None) from None

    def infer(self, task: str, images, *, timeout: Optional[float] = None) -> np.ndarray:
        """``task``'s logits for ``images`` ([n,C,H,W] or one [C,H,W]): ``[n, classes]``."""
        buf = io.BytesIO()
        np.save(buf, np.asarray(images), allow_pickle=False)
        out = self.infer_raw(task, buf.getvalue(), timeout=timeout)
        return np.asarray(out["logits"], dtype=np.float32)

    def infer_raw(self, task: str, body: bytes, ctype: str = "application/x-npy",
                  timeout: Optional[float] = None) -> dict:
        return self._call("POST", f"/infer/{urllib.request.quote(task, safe='')}", body,
                          ctype, timeout)

    def info(self) -> dict:
        return self._call("GET", "/")

    def stats(self, since: Optional[float] = None) -> dict:
        """The replica's batch statistics; ``since`` (unix time) adds the window of batches
        that started after it."""
        return self._call("GET", "/stats" + (f"?since={since!r}" if since is not None else ""))

    def ready(self, timeout: float = 2.0) -> bool:
        try:
            return bool(self._call("GET", "/ready", timeout=timeout).get("ready"))
        except ServeError:
            return False
