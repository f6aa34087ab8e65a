"""``ssf-deploy bundle``: N SSF task packs -> one ONNX model serving mixed-task batches.

Options are parsed here; the work is :func:`ssf_deploy.bundle.bundle` (a new bundle),
:func:`~ssf_deploy.bundle.add_tasks` / :func:`~ssf_deploy.bundle.remove_tasks` (``--into``) and
:func:`~ssf_deploy.bundle.task_table` (``--show``). Nothing is written unless the exactness gate
passes.
"""
from __future__ import annotations

import click

from ..errors import UsageError, VerificationError
from ..verify import DEFAULT_ATOL, DEFAULT_RTOL
from ._common import emit, progress_printer


@click.command()
@click.argument("packs", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False),
              help="Bundle to write (.onnx; its backbone and rows go next to it). With --into: "
                   "write the changed bundle here instead of in place.")
@click.option("--name", "names", multiple=True,
              help="Task name, once per pack in order (default: the pack's name or file stem).")
@click.option("--base-weights", type=click.Path(dir_okay=False),
              help="Base weights (.safetensors/.pth), checked against the packs' recorded base "
                   "hash.")
@click.option("--pretrained", is_flag=True, help="Fetch the base weights from the timm hub.")
@click.option("--max-classes", type=int,
              help="Logits columns (default: the largest task's classes); room for tasks with "
                   "more classes added later.")
@click.option("--into", "into", type=click.Path(dir_okay=False),
              help="Change this bundle: add PACKS to it (and/or --remove tasks).")
@click.option("--remove", "remove", multiple=True, help="With --into: remove the task NAME.")
@click.option("--show", "show", type=click.Path(dir_okay=False),
              help="Print a bundle's task table (name, index, classes) and exit.")
@click.option("--fused-check", default="all", show_default=True,
              help="Tasks also compared with their own fused model: all, none, or a number "
                   "(a fixed sample; every task is always checked against its recorded outputs).")
@click.option("--atol", default=DEFAULT_ATOL, show_default=True, type=float)
@click.option("--rtol", default=DEFAULT_RTOL, show_default=True, type=float)
@click.option("--batch-size", default=32, show_default=True, type=int,
              help="Mixed-batch size of the exactness gate.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No per-stage progress on stderr.")
def bundle(packs, out, names, base_weights, pretrained, max_classes, into, remove, show,
           fused_check, atol, rtol, batch_size, as_json, quiet):
    """Put N SSF tasks in one ONNX model that runs mixed-task batches, exact per task."""
    from ..bundle import bundle as make_bundle, task_table, update_bundle

    if show:
        if packs or into or remove or out:
            raise UsageError("--show takes only the bundle to show")
        table = task_table(show)
        text = "\n".join([f"{'index':>6}  {'classes':>7}  name"] +
                         [f"{t['index']:>6}  {t['num_classes']:>7}  {t['name']}" for t in table])
        emit({"bundle": show, "tasks": table}, as_json, text)
        return
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if max_classes is not None and max_classes < 1:
        raise UsageError(f"--max-classes must be >= 1, got {max_classes}")
    if names and len(names) != len(packs):
        raise UsageError(f"{len(names)} --name for {len(packs)} pack(s): give one per pack, in "
                         f"order, or none")
    if fused_check not in ("all", "none") and not fused_check.isdigit():
        raise UsageError(f"--fused-check takes all, none or a number, got {fused_check!r}")
    check_fused = {"all": True, "none": False}.get(fused_check) if not fused_check.isdigit() \
        else int(fused_check)
    progress = progress_printer(not (quiet or as_json))
    common = dict(atol=atol, rtol=rtol, batch_size=batch_size, progress=progress)
    try:
        if into:
            if max_classes is not None:
                raise UsageError("--max-classes is fixed when a bundle is made; it cannot change "
                                 "with --into")
            report = update_bundle(into, add=list(packs), remove=list(remove), out=out,
                                     names=list(names) or None, base_weights=base_weights,
                                     pretrained=pretrained, check_fused=check_fused,
                                     **common)
        else:
            if remove:
                raise UsageError("--remove changes an existing bundle: give it with --into")
            if not packs:
                raise UsageError("give the task packs to bundle (or --show / --into a bundle)")
            if not out:
                raise UsageError("give --out tasks.onnx")
            report = make_bundle(list(packs), out=out, names=list(names) or None,
                              base_weights=base_weights, pretrained=pretrained,
                              max_classes=max_classes, check_fused=check_fused, **common)
    except VerificationError as e:
        if e.report is not None:
            emit(e.report.as_dict(), as_json, str(e.report))
        raise VerificationError(f"{e}") from None
    emit(report.as_dict(), as_json, str(report) + "\nPASS")

