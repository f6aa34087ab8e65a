"""``ssf-deploy serve DIR``: serve a Triton model repository's ONNX models with Ray Serve.

Options are parsed here; the work is :func:`ssf_deploy.serve.serve_repository`.
"""
from __future__ import annotations

import click

from ..errors import UsageError


@click.command()
@click.argument("repo", type=click.Path(file_okay=False))
@click.option("--model", "models", multiple=True,
              help="Serve only this model of the repository (repeatable; default: every ONNX "
                   "model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; 0.0.0.0 exposes the server).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-batch-size", type=int,
              help="Images per batch (default: the model's config.pbtxt max_batch_size).")
@click.option("--batch-wait-ms", type=float,
              help="How long a batch waits to fill (default: the config's "
                   "max_queue_delay_microseconds).")
@click.option("--threads", type=int, help="onnxruntime threads per replica (default: all cores).")
@click.option("--replicas", default=1, show_default=True, type=int,
              help="Replicas per model (each holds one session).")
@click.option("--poll", type=float,
              help="Scan the repository every POLL seconds and load new versions (Triton's "
                   "poll mode); without it, SIGHUP loads them (explicit model control).")
@click.option("--metrics-port", type=int,
              help="Expose Prometheus metrics (Ray's and ssf_*) on this port.")
@click.option("--num-cpus", type=int, help="CPUs Ray may use (default: all).")
@click.option("--request-timeout", default=60.0, show_default=True, type=float,
              help="Seconds before the HTTP proxy gives up on a request.")
def serve(repo, models, host, port, max_batch_size, batch_wait_ms, threads, replicas, poll,
          metrics_port, num_cpus, request_timeout):
    """Serve the models of a Triton model repository on this machine (Ray Serve), batching
    requests for different tasks together; new versions load without stopping."""
    from ..serve import ServeOptions, serve_repository

    for opt, v in (("--port", port), ("--replicas", replicas), ("--max-batch-size",
                   max_batch_size), ("--threads", threads), ("--metrics-port", metrics_port),
                   ("--num-cpus", num_cpus)):
        if v is not None and v < 1:
            raise UsageError(f"{opt} must be >= 1, got {v}")
    if poll is not None and poll <= 0:
        raise UsageError(f"--poll must be > 0 seconds, got {poll}")
    if batch_wait_ms is not None and batch_wait_ms < 0:
        raise UsageError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
    opts = ServeOptions(host=host, port=port, models=list(models), max_batch_size=max_batch_size,
                        batch_wait_ms=batch_wait_ms, threads=threads, replicas=replicas,
                        poll=poll, metrics_port=metrics_port, num_cpus=num_cpus,
                        request_timeout_s=request_timeout)
    serve_repository(repo, opts, say=lambda m: click.echo(m, err=False))
