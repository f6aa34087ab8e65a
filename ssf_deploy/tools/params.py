"""``ssf-deploy params``: trainable/total parameters per method, no weights, no forward pass."""
from __future__ import annotations

import json

import click
import torch

from ..models import count_params, create_base_model
from ..tuners import METHODS, apply_method
from ._options import method_options, parse_method_options


def count_for(arch: str, num_classes: int, method: str, **options) -> tuple[int, int]:
    with torch.device("meta"):   # shapes only: ViT-B/16 counts without allocating 344 MB
        model = create_base_model(arch, num_classes)
    apply_method(model, method, **options)
    return count_params(model)


@click.command()
@click.option("--model", "arch", default="vit_base_patch16_224", show_default=True,
              help="timm model name.")
@click.option("--num-classes", default=100, show_default=True, type=int)
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="One method (default: all seven).")
@method_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def params(arch, num_classes, method, as_json, **raw):
    """Trainable and total parameters per tuning method (reproduces Table 5's Params column)."""
    rows = {}
    for m in ([method] if method else METHODS):
        trainable, total = count_for(arch, num_classes, m, **parse_method_options(m, raw))
        rows[m] = {"trainable": trainable, "total": total}
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{arch}, {num_classes} classes")
    click.echo(f"{'method':<12} {'trainable (M)':>14} {'total (M)':>10} {'trainable %':>12}")
    for m, r in rows.items():
        click.echo(f"{m:<12} {r['trainable'] / 1e6:>14.2f} {r['total'] / 1e6:>10.2f} "
                   f"{100.0 * r['trainable'] / r['total']:>11.2f}%")
