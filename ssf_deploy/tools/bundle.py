"""``ssf-deploy bundle``: N SSF task packs -> one ONNX model serving mixed-task batches.

Options are parsed here; the work is :func:`ssf_deploy.bundle.bundle` (a new bundle),
:func:`~ssf_deploy.bundle.update_bundle` (``--into``), :func:`~ssf_deploy.bundle.task_table`
(``--show``), and for a Triton model repository :func:`ssf_deploy.serve.write_triton_repo`
(``--triton-repo``: the result as the next version) and :func:`ssf_deploy.serve.update_repo`
(``--into DIR/<model>``: change a served model's tasks as a new version). Nothing is written
unless the exactness gate passes.
"""
from __future__ import annotations

import os
import shutil
import tempfile

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
@click.option("--into", "into", type=click.Path(),
              help="Change this bundle: add PACKS to it (and/or --remove tasks). A model folder "
                   "of a Triton repository (DIR/<model>): write the change as its next version.")
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
@click.option("--triton-repo", "triton_repo", type=click.Path(file_okay=False),
              help="Also publish the bundle as the next version of DIR/<model> in this Triton "
                   "model repository (config.pbtxt, <N>/model.onnx, tasks.json).")
@click.option("--model", "model_name",
              help="With --triton-repo: the model's name (default: the bundle's file stem).")
@click.option("--engine", type=click.Path(dir_okay=False),
              help="With --triton-repo: a TensorRT engine built from this bundle; adds the "
                   "<model>_trt model (tensorrt_plan).")
@click.option("--max-batch-size", default=16, show_default=True, type=int,
              help="With --triton-repo: max_batch_size of the config (images per batch).")
@click.option("--queue-delay-us", default=2000, show_default=True, type=int,
              help="With --triton-repo: dynamic_batching max_queue_delay_microseconds.")
@click.option("--instance-kind", type=click.Choice(["gpu", "cpu"]),
              help="With --triton-repo: instance_group kind (default: Triton's choice, a GPU "
                   "when there is one).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No per-stage progress on stderr.")
def bundle(packs, out, names, base_weights, pretrained, max_classes, into, remove, show,
           fused_check, atol, rtol, batch_size, triton_repo, model_name, engine,
           max_batch_size, queue_delay_us, instance_kind, as_json, quiet):
    """Put N SSF tasks in one ONNX model that runs mixed-task batches, exact per task.

    With --triton-repo DIR the result is also published as the next version of a Triton model
    repository; --into DIR/<model> changes the tasks of such a model as a new version (a
    running `ssf-deploy serve` or Triton loads it without stopping).
    """
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
    if (model_name or engine or instance_kind) and not triton_repo:
        raise UsageError("--model, --engine and --instance-kind go with --triton-repo DIR")
    if max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    progress = progress_printer(not (quiet or as_json))
    common = dict(atol=atol, rtol=rtol, batch_size=batch_size, progress=progress)
    repo_kw = dict(max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
                   instance_kind={"gpu": "KIND_GPU", "cpu": "KIND_CPU"}.get(instance_kind))
    if triton_repo:
        from ..serve.repo import check_target
        check_target(triton_repo, model_name)       # before the bundle is built, not after
        if engine and not os.path.isfile(engine):
            raise UsageError(f"engine not found: {engine}")
    if into and os.path.isdir(into):
        _change_served_model(into, packs, remove, names, base_weights, pretrained, check_fused,
                             out, triton_repo, common, as_json)
        return
    if into and triton_repo and not packs and not remove:
        _publish(into, triton_repo, model_name, engine, repo_kw, as_json, None)
        return
    temp = None
    if triton_repo and not into and not out:
        if not packs:
            raise UsageError("give the task packs to bundle")
        # beside the repository (same file system: its files are hard-linked into it), not in
        # it (Triton would take any folder there for a model)
        parent = os.path.dirname(os.path.abspath(triton_repo))
        os.makedirs(parent, exist_ok=True)
        temp = tempfile.mkdtemp(prefix=".tmp-bundle-", dir=parent)
        out = os.path.join(temp, f"{model_name or 'tasks'}.onnx")
    try:
        _build(packs, out, names, base_weights, pretrained, max_classes, into, remove,
               check_fused, common, as_json, make_bundle, update_bundle, triton_repo,
               model_name, engine, repo_kw)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def _build(packs, out, names, base_weights, pretrained, max_classes, into, remove, check_fused,
           common, as_json, make_bundle, update_bundle, triton_repo, model_name, engine,
           repo_kw):
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
    if triton_repo:
        _publish(report.path, triton_repo, model_name, engine, repo_kw, as_json, report)
        return
    emit(report.as_dict(), as_json, str(report) + "\nPASS")


def _publish(path, triton_repo, model_name, engine, repo_kw, as_json, report) -> None:
    from ..serve import write_triton_repo
    rep = write_triton_repo(path, triton_repo, model=model_name, engine=engine, **repo_kw)
    data = {"bundle": report.as_dict() if report is not None else None, "repo": rep.as_dict()}
    text = (str(report) + "\n" if report is not None else "") + str(rep)
    emit(data, as_json, text + "\nPASS")


def _change_served_model(folder, packs, remove, names, base_weights, pretrained, check_fused,
                         out, triton_repo, common, as_json) -> None:
    from ..serve import update_repo
    if out or triton_repo:
        raise UsageError("--into DIR/<model> writes the next version of that model: no --out "
                         "or --triton-repo")
    if not packs and not remove:
        raise UsageError("nothing to change: give task packs to add or --remove NAME")
    folder = os.path.normpath(folder)
    try:
        rep = update_repo(os.path.dirname(folder) or ".", os.path.basename(folder),
                          add=list(packs), remove=list(remove), names=list(names) or None,
                          base_weights=base_weights, pretrained=pretrained,
                          check_fused=check_fused, **common)
    except VerificationError as e:
        if e.report is not None:
            emit(e.report.as_dict(), as_json, str(e.report))
        raise VerificationError(f"{e}") from None
    emit(rep.as_dict(), as_json, str(rep.bundle) + "\n" + str(rep) + "\nPASS")

