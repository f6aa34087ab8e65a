"""``ssf-deploy refit``: swap a task pack's fused weights into an engine or ONNX session.

SSF changes only weights, so one built artefact serves every task of a base model:

* ``refit model.plan --pack task.safetensors --base-weights base.safetensors``: TensorRT
  Refitter with the task's weights by ONNX initializer name (the engine must be built with
  ``--refittable``; the ONNX it was built from is needed for the derived weights), checked
  against onnxruntime on the task's own export;
* ``refit model.onnx --pack ...``: a new onnxruntime session on the same ONNX bytes with the
  task's initializers, checked against the task's unfused PyTorch model.

Nothing is written unless the check passes (``--out``).
"""
from __future__ import annotations

import os
import time

import click
import torch

from ..errors import UsageError, VerificationError
from ..fileio import atomic_path, check_manifest, check_writable
from ._common import base_options, emit, load_task, tuned_model


def _inputs(settings, batch_size, n, seed=0) -> list:
    b = batch_size if settings["dynamic_batch"] else int(settings["batch_size"])
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *settings["chw"], generator=g) for _ in range(max(1, n))]


@click.command()
@click.argument("target", metavar="MODEL.plan|MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--pack", required=True, type=click.Path(dir_okay=False),
              help="Task pack (.safetensors) to swap in.")
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
def refit(target, pack, base_weights, pretrained, allow_base_mismatch, onnx_opt, out, atol, rtol,
          n_inputs, batch_size, device, verbose, as_json):
    """Refit a TensorRT engine / ONNX Runtime session with a task pack's fused weights."""
    from .. import engine as E
    from ..refit import check_task_matches, export_settings, load_onnx

    is_plan = target.endswith(E.PLAN_SUFFIXES)
    if not is_plan and not target.endswith(".onnx"):
        raise UsageError(f"refit takes an engine ({'/'.join(E.PLAN_SUFFIXES)}) or an .onnx "
                             f"file: {target}")
    if n_inputs < 1 or batch_size < 1:
        raise UsageError("--inputs and --batch-size must be >= 1")
    if out:
        want = E.PLAN_SUFFIXES if is_plan else (".onnx",)
        if not out.endswith(want):
            raise UsageError(f"--out must end with {'/'.join(want)} for this target: {out}")
        check_writable(out, E.sidecar_path(out) if is_plan else None)
    if is_plan:
        if not os.path.isfile(target):
            raise UsageError(f"engine file not found: {target}")
        E.cuda_device(device)
        onnx_path = E.resolve_onnx_for_plan(target, onnx_opt)
    else:
        if onnx_opt:
            raise UsageError("--onnx is for .plan targets (the .onnx target is the graph)")
        onnx_path = target
    proto = load_onnx(onnx_path)
    # INT8/FP8: the scales were calibrated on the weights in the file; swapping weights under
    # them gives a wrong model, whatever a comparison on random inputs says
    E.refuse_quantized_refit(E.read_sidecar(target) if is_plan else {}, proto, source=target)
    settings = export_settings(proto)
    task = load_task(None, pack)
    if task.method != "ssf":
        raise UsageError(f"the pack holds method '{task.method}'; only ssf refits")
    check_task_matches(proto, task, source=onnx_path)
    trt = dev = None
    if is_plan:   # before the heavy work: without TensorRT a .plan cannot be used at all
        trt = E.import_tensorrt()
        dev = E.require_cuda(device)

    from ..fuse import fuse
    t0 = time.perf_counter()
    model = tuned_model(task, None, None, base_weights, pretrained, allow_base_mismatch)
    g = torch.Generator().manual_seed(1)
    fused = fuse(model, torch.randn(2, *settings["chw"], generator=g))
    prep = time.perf_counter() - t0
    inputs = _inputs(settings, batch_size, n_inputs)
    if is_plan:
        _refit_plan(trt, target, onnx_path, proto, settings, task, model, fused, out, atol, rtol,
                    inputs, verbose, as_json, prep, pack, dev)
    else:
        _refit_onnx(onnx_path, proto, model, fused, out, atol, rtol, inputs, as_json, prep, pack)


def _refit_onnx(onnx_path, proto, model, fused, out, atol, rtol, inputs, as_json, prep, pack):
    from ..refit import TaskOrtRunner, bake_initializers, compute_task_weights
    from ..verify import verify

    atol, rtol = _tol(atol, rtol, False)
    t0 = time.perf_counter()
    weights = compute_task_weights(proto, fused.state_dict(), fused)
    t_weights = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner = TaskOrtRunner(onnx_path, weights.values,
                           label="onnxruntime (same ONNX, task initializers)")
    t_session = time.perf_counter() - t0
    report = verify(model, runner, inputs, atol=atol, rtol=rtol, names=["logits"])
    report.reference = "unfused task (PyTorch)"
    golden = _golden(model, runner, settings_of(proto), atol, rtol)
    lines = [f"task {pack} on {onnx_path}: {weights.summary()}",
             f"task model + fuse {prep:.2f} s, weights by name {t_weights:.2f} s, new session "
             f"with swapped initializers {t_session:.3f} s", str(report)]
    lines += [str(golden)] if golden is not None else []
    passed = report.passed and (golden is None or golden.passed)
    result = {"target": onnx_path, "pack": pack, "weights": weights.as_dict(),
              "seconds": {"task_and_fuse": round(prep, 3), "weights": round(t_weights, 3),
                          "session": round(t_session, 4)},
              "verify": report.as_dict(),
              "verify_recorded": golden.as_dict() if golden is not None else None,
              "passed": passed}
    if not passed:
        emit(result, as_json, "\n".join(lines))
        raise VerificationError("onnxruntime with the task's initializers does not match the "
                                "task (its unfused model, or the outputs recorded at training) "
                                "— nothing written")
    if out:
        import onnx
        baked = bake_initializers(proto, weights.values)
        with atomic_path(out) as tmp:
            onnx.save(baked, tmp)
        lines.append(f"wrote {out} (the same graph holding the task's weights)")
        result["out"] = out
    emit(result, as_json, "\n".join(lines) + "\nPASS")


def settings_of(proto):
    from ..refit import export_settings
    return export_settings(proto)


def _golden(model, runner, settings, atol, rtol):
    """The refitted artefact against the outputs recorded when the task was trained."""
    from ..deploy import GoldenProbe
    from ..formats.task import provenance_of
    probe = (provenance_of(model) or {}).get("probe")
    if probe is None:
        return None
    golden = GoldenProbe(probe)
    if tuple(golden.inputs.shape[1:]) != tuple(settings["chw"]):
        return None
    return golden.check(runner, getattr(runner, "label", "refitted"), atol=atol, rtol=rtol,
                        per_sample=not settings["dynamic_batch"])


def _tol(atol, rtol, fp16):
    from ..verify import resolve_tolerances
    return resolve_tolerances(atol, rtol, fp16)


def _refit_plan(trt, plan, onnx_path, proto, settings, task, model, fused, out, atol, rtol,
                inputs, verbose, as_json, prep, pack, dev):
    from .. import engine as E
    from ..export import OrtRunner
    from ..refit import bake_initializers, compute_task_weights, graph_weight_names
    from ..verify import verify

    side = E.read_sidecar(plan)
    prec = E.sidecar_precision(side)
    atol, rtol = _tol(atol, rtol, prec.name in ("fp16", "tf32"))
    logger = E.make_logger(trt, verbose)
    check_manifest(plan)
    with open(plan, "rb") as f:
        engine, runtime = E.deserialize(f.read(), trt, logger, device=dev)
    state = fused.state_dict()
    holder = {}

    known = graph_weight_names(proto)

    def weights_for(names):
        t0 = time.perf_counter()
        holder["w"] = compute_task_weights(proto, state, fused,
                                           names=[n for n in names if n in known])
        holder["seconds"] = time.perf_counter() - t0
        return holder["w"].values

    def onnx_fallback():   # TensorRT-internal weight names: let its ONNX refitter map them
        full = compute_task_weights(proto, state, fused)
        data = bake_initializers(proto, full.values).SerializeToString()
        # an engine built from the fp16-converted ONNX (TensorRT 11 --fp16) holds fp16 weights
        return E.fp16_onnx(data) if prec.fp16_onnx else data

    info = E.refit_engine(engine, weights_for, onnx_fallback=onnx_fallback, trt=trt,
                          logger=logger, device=dev)
    weights = holder["w"]
    runner = E.TrtRunner(engine, label=f"TensorRT (refitted, {prec.name})", runtime=runtime,
                         device=dev)
    b = runner.profile()
    if b and settings["dynamic_batch"]:
        opt = int(b[1][0])
        inputs = [torch.randn(opt, *settings["chw"], generator=torch.Generator().manual_seed(i))
                  for i in range(len(inputs))]
    from ..refit import bake_initializers as _bake
    reference = OrtRunner(_bake(proto, weights.values), providers=["CPUExecutionProvider"],
                          label="onnxruntime (same graph, the task's weights)")
    report = verify(reference, runner, inputs, atol=atol, rtol=rtol, names=runner.outputs)
    golden = _golden(model, runner, settings, atol, rtol)
    build_s = side.get("build_seconds")
    speed = f" vs build {build_s:.2f} s ({build_s / max(info['refit_seconds'], 1e-9):.0f}x)" \
        if isinstance(build_s, (int, float)) else ""
    lines = [f"task {pack} on {plan} (graph {onnx_path}): {weights.summary()}",
             f"refit {info['weights']} weights in {info['refit_seconds']:.3f} s "
             f"({info['method']} + refit_cuda_engine){speed}; task model + fuse {prep:.2f} s, "
             f"weights by name {holder['seconds']:.2f} s", str(report)]
    lines += [str(golden)] if golden is not None else []
    passed = report.passed and (golden is None or golden.passed)
    result = {"target": plan, "onnx": onnx_path, "pack": pack, "weights": weights.as_dict(),
              "refit": info, "build_seconds": build_s, "verify": report.as_dict(),
              "verify_recorded": golden.as_dict() if golden is not None else None,
              "passed": passed}
    if not passed:
        emit(result, as_json, "\n".join(lines))
        raise VerificationError("the refitted engine does not match this task (onnxruntime on "
                                "its weights, or the outputs recorded at training) — nothing "
                                "written")
    if out:
        data = bytes(memoryview(engine.serialize()))
        E.write_plan(out, data, {**side, **E.build_sidecar(onnx_path, out, {}),
                                 "task_pack": pack, "refit": info})
        lines.append(f"wrote {out} (+ {E.sidecar_path(out)})")
        result["out"] = out
    emit(result, as_json, "\n".join(lines) + "\nPASS")
