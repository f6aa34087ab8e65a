"""``ssf-deploy run``: the main job, end to end and offline on built-in defaults.

Options are parsed here; the work is :func:`ssf_deploy.job.run_main_job`.
"""
from __future__ import annotations

import json
import os

import click

from ..errors import UsageError


@click.command()
@click.option("--model", "arch", default="test_resnet", show_default=True, help="timm model.")
@click.option("--model-kwargs", default="{}", show_default=True,
              help='JSON kwargs for timm.create_model, e.g. {"img_size": 32, "patch_size": 8}.')
@click.option("--image-size", default=32, show_default=True, type=int)
@click.option("--pretrain-epochs", default=10, show_default=True, type=int,
              help="Upstream full training that makes the base weights (0: random base).")
@click.option("--epochs", default=8, show_default=True, type=int, help="SSF fine-tuning epochs.")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--workdir", default=os.path.join("models", "run"), show_default=True,
              type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--bench/--no-bench", default=True, show_default=True,
              help="Finish with a small side-by-side cost benchmark.")
@click.option("--bundle/--no-bundle", default=True, show_default=True,
              help="Train a second task on the same base and serve both from one bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
def run(arch, model_kwargs, image_size, pretrain_epochs, epochs, batch_size, workdir, seed, bench,
        bundle, as_json):
    """Train SSF, fuse, verify, export and check ONNX end to end on built-in data, offline."""
    from ..job import MainJobConfig, run_main_job

    try:
        kwargs = json.loads(model_kwargs) if model_kwargs else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-kwargs is not JSON: {e}") from e
    cfg = MainJobConfig(arch=arch, model_kwargs=kwargs, image_size=image_size,
                        pretrain_epochs=pretrain_epochs, epochs=epochs, batch_size=batch_size,
                        workdir=workdir, seed=seed, bench=bench, bundle=bundle,
                        progress=not as_json)
    report = run_main_job(cfg, say=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        click.echo(str(report))
