"""Serving many SSF tasks: the Triton model repository (the artefact GPU users deploy) and a
running server on CPU (Ray Serve) that batches requests for different tasks together.

* :func:`write_triton_repo` publishes a task bundle (or one plain model, such as a fused task)
  as the next version of ``DIR/<model>``: ``config.pbtxt`` checked against Triton's own
  model-config schema, ``<N>/model.onnx`` with its external data as hard links, the task table
  (``tasks.json`` and the config's ``ssf_deploy.tasks`` parameter); an engine adds the
  ``tensorrt_plan`` variant. :func:`update_repo` adds/removes tasks as a new version.
* :func:`serve_repository` (``ssf-deploy serve DIR``) serves every ONNX model of the repository
  with Ray Serve: per-request validation, dynamic batches that mix tasks, new versions loaded
  without stopping (SIGHUP or polling), health, metrics, graceful shutdown.
* :class:`ServeClient` talks to it.

Ray is imported only when a server starts (``pip install "ssf-deploy[serve]"``).
"""
from .client import ServeClient, ServeError
from .repo import (RepoReport, latest_version, model_config, tasks_of_config, update_repo,
                   validate_config, write_triton_repo)
from .server import ServeOptions, serve_repository

__all__ = ["write_triton_repo", "update_repo", "RepoReport", "latest_version", "model_config",
           "validate_config", "tasks_of_config", "serve_repository", "ServeOptions",
           "ServeClient", "ServeError"]
