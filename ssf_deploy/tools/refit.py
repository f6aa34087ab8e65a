"""``ssf-deploy refit``: swap a task pack's fused weights into an engine or ONNX session.

* ``refit model.plan --pack task.safetensors --base-weights base.safetensors``: TensorRT
  Refitter by ONNX initializer name (:func:`ssf_deploy.refit.refit_plan`);
* ``refit model.onnx --pack ...``: onnxruntime on the same ONNX bytes with the task's
  initializers (:func:`ssf_deploy.refit.refit_onnx`).

Options are parsed here; nothing is written unless the library's checks pass (``--out``).
"""
from __future__ import annotations

import click

from ..errors import UsageError, VerificationError
from ._common import base_options, emit, load_task


@click.command()
@click.argument("target", metavar="MODEL.plan|MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--pack", type=click.Path(dir_okay=False),
              help="Task pack (.safetensors) to swap in.")
@click.option("--bundle", "bundle_path", type=click.Path(dir_okay=False),
              help="For an engine built from a task bundle: give it the bundle's tasks now "
                   "(after ssf-deploy bundle --into), by refitting its task table.")
@base_options
@click.option("--onnx", "onnx_opt", type=click.Path(dir_okay=False),
              help="For a .plan: the ONNX it was built from (default: from the sidecar, else "
                   "<stem>.onnx).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Write the refitted engine (.plan) or the ONNX with the task's weights.")
@click.option("--atol", type=float, help="Absolute tolerance (1e-4; 2e-2 for fp16 engines).")
@click.option("--rtol", type=float, help="Relative tolerance (1e-3; 2e-2 for fp16 engines).")
@click.option("--inputs", "n_inputs", default=2, show_default=True, type=int,
              help="Random batches compared.")
@click.option("--batch-size", default=4, show_default=True, type=int,
              help="Batch of the compared inputs (dynamic-batch models).")
@click.option("--device", default="cuda", show_default=True,
              help="For a .plan: the CUDA device to refit and run on (cuda or cuda:N).")
@click.option("--verbose", is_flag=True, help="TensorRT INFO log (on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def refit(target, pack, bundle_path, base_weights, pretrained, allow_base_mismatch, onnx_opt, out,
          atol, rtol, n_inputs, batch_size, device, verbose, as_json):
    """Refit a TensorRT engine / ONNX Runtime session with a task pack's fused weights."""
    from ..engine import PLAN_SUFFIXES
    from ..refit import refit_onnx, refit_plan

    if bool(pack) == bool(bundle_path):
        raise UsageError("give --pack (one task) or --bundle (a bundle engine's tasks)")
    if bundle_path:
        return _bundle(target, bundle_path, out, device, atol, rtol, verbose, as_json)

    is_plan = target.endswith(PLAN_SUFFIXES)
    if not is_plan and not target.endswith(".onnx"):
        raise UsageError(f"refit takes an engine ({'/'.join(PLAN_SUFFIXES)}) or an .onnx "
                         f"file: {target}")
    if onnx_opt and not is_plan:
        raise UsageError("--onnx is for .plan targets (the .onnx target is the graph)")
    kw = dict(base_weights=base_weights, pretrained=pretrained,
              allow_base_mismatch=allow_base_mismatch, atol=atol, rtol=rtol, inputs=n_inputs,
              batch_size=batch_size, warn=lambda msg: click.echo(f"WARNING: {msg}", err=True))
    task = lambda: load_task(None, pack)   # noqa: E731 - read after the target's cheap checks
    try:
        report = (refit_plan(target, task, out, onnx=onnx_opt, device=device, verbose=verbose,
                             **kw) if is_plan else refit_onnx(target, task, out, **kw))
    except VerificationError as e:
        if e.report is not None:
            emit(e.report.as_dict(), as_json, str(e.report))
        raise
    emit(report.as_dict(), as_json, str(report) + "\nPASS")


def _bundle(plan, bundle_path, out, device, atol, rtol, verbose, as_json):
    from ..bundle.engine import refit_bundle_engine
    try:
        report = refit_bundle_engine(plan, bundle_path, out, device=device, atol=atol,
                                     rtol=rtol, verbose=verbose)
    except VerificationError as e:
        if e.report is not None:
            emit(e.report.as_dict(), as_json, str(e.report))
        raise
    emit(report.as_dict(), as_json, str(report) + "\nPASS")
