"""``ssf-deploy train``: fine-tune any timm model with a tuning method (CPU, GPU or torchrun DDP)."""
from __future__ import annotations

import ast
import os
import sys

import click

from ..errors import UsageError
from ..tuners import METHODS
from ._options import method_options, parse_method_options


def _model_args(pairs) -> dict:
    """``KEY=VALUE`` pairs; values are Python literals when they parse as one (8, (1, 1), True)."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--model-arg expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


@click.command()
@click.option("--model", "arch", required=True, help="timm model name (any, e.g. vit_base_patch16_224).")
@click.option("--method", type=click.Choice(METHODS), default="ssf", show_default=True)
@method_options
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Extra timm.create_model kwarg, repeatable (e.g. patch_size=8).")
@click.option("--pretrained", is_flag=True, help="Start from timm hub weights (needs internet).")
@click.option("--pretrained-file", type=click.Path(dir_okay=False), default=None,
              help="Start from a local weights file (offline).")
@click.option("--data", "data", type=click.Path(file_okay=False), default=None,
              help="ImageFolder tree with train/<class>/ and val/<class>/.")
@click.option("--dataset", type=click.Choice(["builtin"]), default=None,
              help="Offline generated dataset (cached in $SSF_DEPLOY_CACHE or models/data).")
@click.option("--num-classes", type=int, default=None, help="Default: number of class folders.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per process.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True)
@click.option("--min-lr", type=float, default=1e-6, show_default=True)
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--mixup", type=float, default=0.0, show_default=True, help="Mixup alpha (0: off).")
@click.option("--cutmix", type=float, default=0.0, show_default=True, help="CutMix alpha (0: off).")
@click.option("--image-size", type=int, default=None, help="Default: the model's input size.")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint path [default: models/<arch>-<method>.pt, or the --resume file].")
@click.option("--resume", type=click.Path(dir_okay=False), default=None,
              help="Continue a checkpoint written by train (same model and method).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--amp/--no-amp", default=True, show_default=True, help="fp16 autocast on CUDA.")
@click.option("--max-steps-per-epoch", type=int, default=None, help="Cap steps (quick runs).")
@click.option("--hflip", type=float, default=0.5, show_default=True,
              help="Horizontal-flip probability (0 for digits, text).")
@click.option("--color-jitter", type=float, default=0.4, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar (logs, CI).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the training forward (the first steps compile).")
def train(arch, method, model_args, pretrained, pretrained_file, data, dataset, num_classes,
          epochs, batch_size, lr, weight_decay, warmup_epochs, min_lr, label_smoothing, mixup,
          cutmix, image_size, workers, seed, out, resume, device, amp, max_steps_per_epoch,
          hflip, color_jitter, no_progress, compile_, **raw):
    """Fine-tune a timm model with a tuning method; checkpoint after every epoch.

    Multi-GPU: torchrun --nproc_per_node N -m ssf_deploy.tools.train --model ...
    """
    from ..train import TrainConfig, train as run_training

    if pretrained and pretrained_file:
        raise UsageError("pass --pretrained or --pretrained-file, not both")
    cfg = TrainConfig(arch=arch, method=method, method_options=parse_method_options(method, raw),
                      model_kwargs=_model_args(model_args), pretrained=pretrained,
                      pretrained_file=pretrained_file, data=data, dataset=dataset,
                      num_classes=num_classes, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr,
                      label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix,
                      image_size=image_size, workers=workers, seed=seed, out=out, resume=resume,
                      device=device, amp=amp, max_steps_per_epoch=max_steps_per_epoch,
                      hflip=hflip, color_jitter=color_jitter, progress=not no_progress,
                      compile=compile_)
    result = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:   # under torchrun only rank 0 reports
        top1 = f"{result.top1:.2f}%" if result.top1 is not None else "n/a"
        click.echo(f"done: {result.epochs} epochs, val top1 {top1}, checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":   # torchrun --nproc_per_node N -m ssf_deploy.tools.train --model ...
    try:
        from ssf_deploy_launcher import main
    except ImportError:   # the package copied without its launcher
        from . import main
    sys.exit(main(["train", *sys.argv[1:]]))
