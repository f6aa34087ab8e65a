"""``ssf-deploy fuse``: load -> fold -> verify -> ONNX -> checker/onnxsim -> onnxruntime check.

Options are parsed here; the work is :func:`ssf_deploy.deploy.deploy`. Nothing is written unless
every check passes.
"""
from __future__ import annotations

import click

from ..errors import UsageError, VerificationError
from ..fileio import check_writable
from ..verify import DEFAULT_ATOL, DEFAULT_RTOL
from ._common import (base_options, emit, image_size_for, load_task, make_inputs,
                      progress_printer, tuned_model)


@click.command()
@click.argument("ckpt", required=False, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--pack", type=click.Path(dir_okay=False), help="Task pack instead of a checkpoint.")
@click.option("--model", "arch", help="timm architecture (default: from the checkpoint).")
@click.option("--num-classes", type=int, help="Classes (default: from the checkpoint).")
@base_options
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--dynamic-batch", is_flag=True, help="Export with a dynamic batch dimension.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--save-weights", type=click.Path(dir_okay=False),
              help="Also write the fused weights (.safetensors).")
@click.option("--save-pack", type=click.Path(dir_okay=False),
              help="Also write the task pack (SSF factors + head, .safetensors).")
@click.option("--atol", default=DEFAULT_ATOL, show_default=True, type=float)
@click.option("--rtol", default=DEFAULT_RTOL, show_default=True, type=float)
@click.option("--inputs", "inputs_spec", default="1", show_default=True,
              help="N random batches, or a folder of images (the golden probe is checked too).")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--image-size", type=int,
              help="Input resolution (default: the one the task was trained at).")
@click.option("--compare-graph", type=click.Choice(["cached", "always", "never"]),
              default="cached", show_default=True,
              help="Compare the ONNX with the base export: cached statistics, a fresh export, "
                   "or not at all.")
@click.option("--strict-graph", is_flag=True,
              help="Fail unless the ONNX graph equals the base export node for node.")
@click.option("--allow-extra-nodes", is_flag=True,
              help="Deploy a checkpoint whose forward the base graph cannot compute (official "
                   "ConvNeXt-hnf: norm_pre twice) as the base graph plus those nodes, reported.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No per-stage progress on stderr.")
def fuse(ckpt, out, pack, arch, num_classes, base_weights, pretrained, allow_base_mismatch, opset,
         dynamic_batch, no_simplify, save_weights, save_pack, atol, rtol, inputs_spec, batch_size,
         image_size, compare_graph, strict_graph, allow_extra_nodes, as_json, quiet):
    """Fold SSF into the base weights, verify, export ONNX, check it in onnxruntime."""
    from ..deploy import deploy
    from ..models import creation_record

    if out and not out.endswith(".onnx"):
        raise UsageError(f"--out must end with .onnx: {out}")
    if strict_graph and compare_graph == "never":
        raise UsageError("--strict-graph needs the base graph: drop --compare-graph never")
    check_writable(out, save_weights, save_pack)
    task = load_task(ckpt, pack)
    if task.method != "ssf":
        raise UsageError(f"checkpoint holds method '{task.method}'; only ssf fuses")
    model = tuned_model(task, arch, num_classes, base_weights, pretrained, allow_base_mismatch)
    inputs = make_inputs(inputs_spec, model, batch_size, image_size_for(task, image_size))
    rec = creation_record(model) or {}
    try:
        report = deploy(model, inputs, out=out, atol=atol, rtol=rtol, opset=opset,
                        dynamic_batch=dynamic_batch, simplify=not no_simplify,
                        save_weights=save_weights, save_pack=save_pack,
                        pack_info={"arch": rec.get("arch"), "num_classes": rec.get("num_classes"),
                                   "model_kwargs": rec.get("kwargs")},
                        compare_graph=compare_graph, strict_graph=strict_graph,
                        graph_key={"arch": rec.get("arch"), "kwargs": rec.get("kwargs"),
                                   "num_classes": rec.get("num_classes")} if rec else None,
                        onnx_metadata={"arch": rec.get("arch") or "",
                                       "num_classes": rec.get("num_classes") or 0,
                                       "fused_from": "ssf"},
                        progress=progress_printer(not (quiet or as_json)),
                        allow_extra_nodes=allow_extra_nodes)
    except VerificationError as e:
        emit(e.report.as_dict(), as_json, str(e.report))
        raise VerificationError(f"{e} — nothing written") from e
    written = "" if out or save_weights or save_pack else \
        "\nnote: no --out given, so no ONNX was written (checked in PyTorch only)"
    emit(report.as_dict(), as_json, str(report) + written + "\nPASS")
