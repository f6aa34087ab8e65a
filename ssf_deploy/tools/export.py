"""``ssf-deploy export``: the plain base model through the same ONNX recipe as ``fuse``."""
from __future__ import annotations

import click

from ..errors import UsageError
from ..models import create_base_model, sized_kwargs
from ._common import emit


@click.command()
@click.option("--model", "arch", required=True, help="timm architecture.")
@click.option("--num-classes", required=True, type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--pretrained", is_flag=True, help="Base weights from the timm hub.")
@click.option("--base-weights", "--pretrained-file", "base_weights",
              type=click.Path(dir_okay=False), help="Base weights file, offline.")
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--dynamic-batch", is_flag=True)
@click.option("--no-simplify", is_flag=True)
@click.option("--image-size", type=int)
@click.option("--save-weights", type=click.Path(dir_okay=False),
              help="Also write the base weights (.safetensors), e.g. to share under packs.")
@click.option("--json", "as_json", is_flag=True)
def export(arch, num_classes, out, pretrained, base_weights, opset, dynamic_batch, no_simplify,
           image_size, save_weights, as_json):
    """Export the plain base model to ONNX (reference for node counts and TensorRT)."""
    from ..export import export_onnx
    from ..fileio import OutputSet, check_writable, manifest_path, save_safetensors

    if not out.endswith(".onnx"):
        raise UsageError(f"--out must end with .onnx: {out}")
    check_writable(out, save_weights)
    kwargs, size = sized_kwargs(arch, {}, image_size)   # ViT/Swin take img_size, CNNs any size
    model = create_base_model(arch, num_classes, pretrained=pretrained,
                              pretrained_file=base_weights, **kwargs).eval()
    with OutputSet() as outs:   # both or neither, then their manifest
        info = export_onnx(model, outs.add(out), image_size=size, opset=opset,
                           dynamic_batch=dynamic_batch, simplify=not no_simplify,
                           metadata={"arch": arch, "num_classes": num_classes,
                                     "fused_from": "base"})
        info["path"] = out
        if save_weights:
            save_safetensors(model.state_dict(), outs.add(save_weights))
    text = f"wrote {out}: {info['nodes']} nodes, {info['parameters']:,} parameters, ops {info['ops']}"
    if save_weights:
        info.update(weights=save_weights, manifest=manifest_path(out))
        text += f"\nwrote {save_weights} (+ {manifest_path(out)})"
    emit(info, as_json, text)

