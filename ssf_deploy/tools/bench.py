"""``ssf-deploy bench``: training and inference cost of every tuning method in one run."""
from __future__ import annotations

import json

import click

from ..errors import UsageError


@click.command()
@click.option("--method", default="all", show_default=True,
              help="all, or one method (comma list allowed); base, full, ssf, frozen and "
                   "ssf-fused always run too. Rows: base full linear bias adapter vpt-shallow "
                   "vpt-deep ssf ssf-naive frozen ssf-fused.")
@click.option("--prompts", type=int, default=None,
              help="VPT prompt tokens (default: 200 shallow, 50 deep, as in Figure 3).")
@click.option("--adapter-dim", type=int, default=None, help="Adapter bottleneck width d' (12).")
@click.option("--model", "arch", default="vit_base_patch16_224", show_default=True,
              help="timm model name (on a CPU, vit_small_patch16_224 is ~4x quicker).")
@click.option("--model-kwargs", default=None,
              help='Extra timm.create_model kwargs as JSON, e.g. \'{"depth": 2}\'.')
@click.option("--num-classes", default=100, show_default=True, type=int)
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--image-size", default=None, type=int, help="Input resolution (model default).")
@click.option("--device", default=None, help="cuda[:N] or cpu (default: cuda when present).")
@click.option("--amp/--no-amp", default=None,
              help="Mixed precision (default: on for CUDA like the paper, off (fp32) on CPU).")
@click.option("--backend", default="torch", show_default=True,
              help="Inference runtime: torch, onnxruntime or tensorrt.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the trained and inferred models (the first steps compile).")
@click.option("--warmup", default=None, type=int, help="Warm-up iterations (default 5 GPU, 1 CPU).")
@click.option("--iters", default=None, type=int, help="Timed iterations (default 50 GPU, 5 CPU).")
@click.option("--repeat", default=1, show_default=True, type=int,
              help="Timing rounds with the rows interleaved (A B C A B C ...); medians reported.")
@click.option("--isolate/--no-isolate", default=None,
              help="Each pass in a fresh subprocess (default on CPU: sound peak memory).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (no table).")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Write the report as JSON to this file.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write a Figure-3-style PNG.")
@click.option("--no-progress", is_flag=True, help="No progress on stderr.")
def bench(method, prompts, adapter_dim, arch, model_kwargs, num_classes, batch_size, image_size,
          device, amp, backend, compile_, warmup, iters, repeat, isolate, seed, as_json, out_path,
          plot_path, no_progress):
    """Benchmark every tuning method: params, FLOPs, train step, memory, inference (Fig. 3).

    Timings and memory are measured in separate passes; progress and warnings go to stderr.
    """
    import torch

    from .. import bench as B
    from ..models import resolve_arch, sized_kwargs

    rows = B.resolve_methods(method)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = B.check_device(device)
    backend = B.check_backend(backend, device)
    cuda = device.startswith("cuda")
    for name, v in (("--batch-size", batch_size), ("--num-classes", num_classes),
                    ("--repeat", repeat)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    if iters is not None and iters < 1:
        raise UsageError(f"--iters must be >= 1, got {iters}")
    if warmup is not None and warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    if prompts is not None and prompts < 1:
        raise UsageError(f"--prompts must be >= 1, got {prompts}")
    if adapter_dim is not None and adapter_dim < 1:
        raise UsageError(f"--adapter-dim must be >= 1, got {adapter_dim}")
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size must be >= 1, got {image_size}")
    if compile_ and backend != "torch":
        raise UsageError("--compile applies to the torch backend only")
    try:
        kwargs = json.loads(model_kwargs) if model_kwargs else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-kwargs is not JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise UsageError("--model-kwargs must be a JSON object")
    arch = resolve_arch(arch)
    sized_kwargs(arch, kwargs, image_size)   # a model/size that cannot be built fails here
    from ..fileio import OutputSet, check_writable, write_json
    check_writable(out_path, plot_path)      # before minutes of measuring
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise UsageError('--plot needs matplotlib: pip install "ssf-deploy[bench]"') from e
    cfg = B.BenchConfig(arch=arch, num_classes=num_classes, batch_size=batch_size,
                        image_size=image_size, device=device, amp=cuda if amp is None else amp,
                        backend=backend, warmup=(5 if cuda else 1) if warmup is None else warmup,
                        iters=(50 if cuda else 5) if iters is None else iters, prompts=prompts,
                        adapter_dim=adapter_dim, model_kwargs=kwargs, seed=seed,
                        compile=compile_)
    report = B.run_bench(cfg, rows, isolate=isolate, progress=not no_progress, repeat=repeat)
    with OutputSet(manifest=False) as outs:   # the report and its plot land together or not at all
        if out_path:
            write_json(report, outs.add(out_path))
        if plot_path:
            B.plot(report, outs.add(plot_path))
    if as_json:
        click.echo(json.dumps(report, indent=1, default=str))
        return
    click.echo(B.format_table(report))
    for path in (out_path, plot_path):
        if path:
            click.echo(f"wrote {path}")
