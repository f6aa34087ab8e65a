"""``ssf-deploy fuse``: load -> fold -> verify in PyTorch -> ONNX -> checker/onnxsim -> ORT check.

Nothing is written unless every check passes: artefacts go to temp files renamed at the end.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from typing import Optional

import click

from ..checkpoint import atomic_path
from ..errors import SSFDeployError
from ..verify import DEFAULT_ATOL, DEFAULT_RTOL, verify as run_verify
from ._common import emit, load_task, make_inputs, tuned_model


def fuse_pipeline(model, *, out: Optional[str] = None, inputs: list, atol: float, rtol: float,
                  opset: int = 17, dynamic_batch: bool = False, simplify: bool = True,
                  save_weights: Optional[str] = None, save_pack: Optional[str] = None,
                  strict_graph: bool = False, arch: Optional[str] = None,
                  num_classes: Optional[int] = None, model_kwargs: Optional[dict] = None) -> dict:
    """The whole fuse job on an unfused tuned model; raises SSFDeployError on any failed check."""
    from ..export import OrtRunner, export_onnx, graph_stats, onnx_bytes
    from ..fuse import fuse
    from ..tuners import unload

    model = model.eval()
    t0 = time.perf_counter()
    fused, freport = fuse(model, inputs[0][:2], return_report=True)
    result = {"fuse": freport.as_dict(), "fuse_seconds": round(time.perf_counter() - t0, 3)}
    torch_report = run_verify(model, fused, inputs, atol=atol, rtol=rtol, names=["logits"])
    torch_report.reference, torch_report.candidate = "unfused (PyTorch)", "fused (PyTorch)"
    result["verify_torch"] = torch_report.as_dict()
    reports = [str(freport), str(torch_report)]
    if not torch_report.passed:
        raise _Failed(result, reports, "fused PyTorch model does not match the unfused model")

    # every output is a temp file renamed only when the whole block succeeds (atomic_path)
    with contextlib.ExitStack() as outs:
        if out:
            tmp = outs.enter_context(atomic_path(out))
            example = inputs[0][:1]
            info = export_onnx(fused, tmp, example=example, opset=opset,
                               dynamic_batch=dynamic_batch, simplify=simplify,
                               metadata={"arch": arch or "", "num_classes": num_classes or 0,
                                         "fused_from": "ssf"})
            info["path"] = out
            base = unload(copy.deepcopy(model))
            base_info = graph_stats(onnx_bytes(base, example=example, opset=opset,
                                               dynamic_batch=dynamic_batch, simplify=simplify))
            same = base_info["nodes"] == info["nodes"] and base_info["ops"] == info["ops"]
            result["onnx"] = {"fused": info, "base": base_info, "same_graph_as_base": same}
            ort_inputs = inputs if dynamic_batch else [x[i:i + 1] for x in inputs
                                                       for i in range(x.shape[0])]
            ort_report = run_verify(model, OrtRunner(tmp), ort_inputs, atol=atol, rtol=rtol,
                                    names=["logits"])
            ort_report.reference, ort_report.candidate = "unfused (PyTorch)", "fused (onnxruntime)"
            result["verify_onnxruntime"] = ort_report.as_dict()
            reports.append(f"ONNX {out}: {info['nodes']} nodes (base export: "
                           f"{base_info['nodes']}), op histogram "
                           f"{'identical to' if same else 'DIFFERENT from'} the base export, "
                           f"{info['parameters']:,} parameters (base {base_info['parameters']:,})")
            if not same:
                reports.append("  note: the exporter folds equal initializers (e.g. the all-zero "
                               "biases of an untrained base) differently; compare with a trained "
                               "base" + ("" if freport.added else ", or see the fuse report"))
            reports.append(str(ort_report))
            if not ort_report.passed:
                raise _Failed(result, reports, "onnxruntime output does not match the unfused model")
            if strict_graph and not same:
                raise _Failed(result, reports, "fused ONNX graph differs from the base export")
        if save_weights:
            from safetensors.torch import save_file
            tmp = outs.enter_context(atomic_path(save_weights))
            save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, tmp)
            result["weights"] = save_weights
        if save_pack:
            from ..pack import save_pack as write_pack
            tmp = outs.enter_context(atomic_path(save_pack))
            write_pack(model, tmp, arch=arch, num_classes=num_classes, model_kwargs=model_kwargs)
            result["pack"] = {"path": save_pack, "bytes": os.path.getsize(tmp)}
            reports.append(f"task pack {save_pack}: {os.path.getsize(tmp) / 1e6:.2f} MB")
    result["passed"] = True
    result["text"] = "\n".join(reports)
    return result


class _Failed(SSFDeployError):
    def __init__(self, result, reports, why):
        super().__init__(why)
        self.result, self.reports = result, reports


@click.command()
@click.argument("ckpt", required=False, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--pack", type=click.Path(dir_okay=False), help="Task pack instead of a checkpoint.")
@click.option("--model", "arch", help="timm architecture (default: from the checkpoint).")
@click.option("--num-classes", type=int, help="Classes (default: from the checkpoint).")
@click.option("--base-weights", type=click.Path(dir_okay=False),
              help="Base model weights (.safetensors/.pth), offline.")
@click.option("--pretrained", is_flag=True, help="Fetch base weights from the timm hub.")
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--dynamic-batch", is_flag=True, help="Export with a dynamic batch dimension.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--save-weights", type=click.Path(dir_okay=False),
              help="Also write the fused weights (.safetensors).")
@click.option("--save-pack", type=click.Path(dir_okay=False),
              help="Also write the task pack (SSF factors + head, .safetensors).")
@click.option("--atol", default=DEFAULT_ATOL, show_default=True, type=float)
@click.option("--rtol", default=DEFAULT_RTOL, show_default=True, type=float)
@click.option("--inputs", "inputs_spec", default="2", show_default=True,
              help="N random batches, or a folder of images.")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--image-size", type=int, help="Override the input resolution.")
@click.option("--strict-graph", is_flag=True,
              help="Fail unless the ONNX graph equals the base export node for node.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def fuse(ckpt, out, pack, arch, num_classes, base_weights, pretrained, opset, dynamic_batch,
         no_simplify, save_weights, save_pack, atol, rtol, inputs_spec, batch_size, image_size,
         strict_graph, as_json):
    """Fold SSF into the base weights, verify, export ONNX, check it in onnxruntime."""
    if out and not out.endswith(".onnx"):
        raise SSFDeployError(f"--out must end with .onnx: {out}")
    task = load_task(ckpt, pack)
    if task.method != "ssf":
        raise SSFDeployError(f"checkpoint holds method '{task.method}'; only ssf fuses")
    model = tuned_model(task, arch, num_classes, base_weights, pretrained)
    inputs = make_inputs(inputs_spec, model, batch_size, image_size)
    from ..models import creation_record
    rec = creation_record(model) or {}
    try:
        result = fuse_pipeline(model, out=out, inputs=inputs, atol=atol, rtol=rtol, opset=opset,
                               dynamic_batch=dynamic_batch, simplify=not no_simplify,
                               save_weights=save_weights, save_pack=save_pack,
                               strict_graph=strict_graph, arch=rec.get("arch"),
                               num_classes=rec.get("num_classes"), model_kwargs=rec.get("kwargs"))
    except _Failed as e:
        emit({**e.result, "passed": False, "error": str(e)}, as_json, "\n".join(e.reports))
        raise SSFDeployError(f"{e} — nothing written")
    text = result.pop("text")
    emit(result, as_json, text + "\nPASS")
