"""Task bundles: N SSF tasks in one ONNX model, mixed-task batches, exact per task (CPU, tiny).

The references are things the bundle code did not make: each task's outputs recorded when it was
saved (golden probe), each task's own fused model from the real fuser, exported and run in
onnxruntime, and onnxruntime running the bundle file itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import ssf_deploy
from ssf_deploy.bundle import (BundleRunner, add_tasks, remove_tasks, task_table, update_bundle,
                               verify_bundle)
from ssf_deploy.bundle.files import META_KEY, backbone_location, row_location
from ssf_deploy.errors import (BaseMismatchError, CheckpointError, SSFDeployError, UsageError,
                               VerificationError)
from ssf_deploy.export import OrtRunner, export_onnx
from ssf_deploy.fileio import save_safetensors
from ssf_deploy.formats.checkpoint import save_task
from ssf_deploy.formats.pack import read_pack, save_pack

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (timm name, create_model kwargs, image size)
ARCHS = {
    "vit": ("test_vit", dict(img_size=32, patch_size=8), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                                  window_size=4, img_size=32), 32),
    "convnext": ("test_convnext", {}, 32),
    "resnet": ("test_resnet", {}, 32),
}


def _base(tmp, family, seed=0):
    arch, kw, _ = ARCHS[family]
    torch.manual_seed(seed)
    base = ssf_deploy.create_base_model(arch, 5, **kw)
    with torch.no_grad():     # "pretrained-like": no all-zero biases or unit norms
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for n, b in base.named_buffers():
            if n.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    path = os.path.join(tmp, f"base-{family}-{seed}.safetensors")
    save_safetensors(base.state_dict(), path)
    return path


def _task(tmp, family, base_file, seed, classes, *, name=None, kind="pt"):
    """A trained-like SSF task on ``base_file``: perturbed factors, head and BN statistics."""
    arch, kw, size = ARCHS[family]
    m = ssf_deploy.create_base_model(arch, classes, pretrained_file=base_file, **kw)
    ssf_deploy.apply_method(m, "ssf")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for n, b in m.named_buffers():      # BN trains its statistics with the task
            if n.endswith("running_mean"):
                b.add_(torch.randn(b.shape, generator=g) * 0.1)
    stem = os.path.join(tmp, name or f"{family}{seed}")
    save_task(m, stem + ".pt", image_size=size)
    if kind == "pt":
        return stem + ".pt", m
    # a pack as users write one: from the checkpoint, rebuilt on its base (fuse --save-pack)
    rebuilt = ssf_deploy.build_model(ssf_deploy.read_task(stem + ".pt"), base_weights=base_file)
    save_pack(rebuilt, stem + ".safetensors")
    os.unlink(stem + ".pt")
    return stem + ".safetensors", m


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("bundle-vit"))
    base = _base(tmp, "vit")
    tasks = [_task(tmp, "vit", base, s, c, kind=k) for s, c, k in
             [(1, 5, "pt"), (2, 7, "pack"), (3, 5, "pt")]]
    out = os.path.join(tmp, "tasks.onnx")
    report = ssf_deploy.bundle([p for p, _ in tasks], out=out, base_weights=base)
    return {"tmp": tmp, "base": base, "tasks": tasks, "out": out, "report": report}


def _fused_onnx_logits(model, x, tmp, name):
    """The task deployed alone: the real fuser, exported, run in onnxruntime."""
    path = os.path.join(tmp, f"{name}-fused.onnx")
    export_onnx(ssf_deploy.fuse(model.eval(), x[:2]), path, example=x[:1], dynamic_batch=True)
    return OrtRunner(path)(x)[0].numpy()


def test_one_model_runs_mixed_batches_exactly_per_task(vit):
    rep = vit["report"]
    assert rep.passed and rep.gate.passed
    assert [t["name"] for t in rep.tasks] == ["vit1", "vit2", "vit3"]
    assert rep.gate.fused_checked == 3 and rep.gate.worst("recorded") < 1e-4
    runner = BundleRunner(vit["out"])
    ins = {i.name: (i.type, len(i.shape)) for i in runner.session.get_inputs()}
    assert ins == {"images": ("tensor(float)", 4), "task": ("tensor(int64)", 1)}
    out = runner.session.get_outputs()[0]
    assert out.name == "logits" and out.type == "tensor(float)" and out.shape[1] == 7
    # every task in one shuffled batch vs each task deployed on its own (fused ONNX)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    task = np.array([2, 0, 1, 1, 2, 0], dtype=np.int64)
    got = runner(x, task)
    for t, (_, model) in enumerate(vit["tasks"]):
        own = _fused_onnx_logits(model, x, vit["tmp"], f"t{t}")
        c = own.shape[1]
        rows = np.where(task == t)[0]
        np.testing.assert_allclose(got[rows, :c], own[rows], atol=1e-4, rtol=1e-3)
        assert not np.any(got[rows, c:])        # columns past the task's classes: zeros


def test_a_sample_does_not_move_when_its_neighbours_change(vit):
    runner = BundleRunner(vit["out"])
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    a = runner(x, np.array([0, 1, 2, 0, 1, 2, 0, 1]))
    b = runner(x, np.array([0, 2, 2, 1, 1, 0, 0, 2]))   # positions 0, 2, 4, 6 keep their task
    np.testing.assert_array_equal(a[[0, 2, 4, 6]], b[[0, 2, 4, 6]])
    assert not np.allclose(a[1], b[1])                  # and the task does matter


def test_task_table_is_in_the_metadata_not_the_argument_order(vit):
    table = task_table(vit["out"])
    assert table == [{"name": "vit1", "index": 0, "num_classes": 5},
                     {"name": "vit2", "index": 1, "num_classes": 7},
                     {"name": "vit3", "index": 2, "num_classes": 5}]
    proto = onnx.load(vit["out"], load_external_data=False)
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == META_KEY))
    assert meta["base"]["sha256"] == vit["report"].anchor["sha256"]
    runner = BundleRunner(vit["out"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    per_sample = runner.run(x, ["vit2", "vit3"])
    assert [len(r) for r in per_sample] == [7, 5]
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        runner.run(x[:1], ["nope"])


@pytest.mark.parametrize("family", ["swin", "convnext", "resnet"])
def test_families(tmp_path, family):
    """Swin runs windows (B * nW rows per site), ConvNeXt channels-first norms, ResNet its
    BatchNorm statistics per task: each still matches its tasks exactly."""
    base = _base(str(tmp_path), family)
    paths = [_task(str(tmp_path), family, base, s, c, kind=k)[0]     # a checkpoint and a pack
             for s, c, k in [(1, 4, "pt"), (2, 6, "pack")]]
    rep = ssf_deploy.bundle(paths, out=str(tmp_path / "b.onnx"), base_weights=base)
    assert rep.passed and rep.gate.fused_checked == 2
    assert rep.gate.worst("recorded") < 1e-4 and rep.gate.worst("fused") < 1e-4
    assert rep.gate.neighbour_max_abs == 0.0
    if family == "swin":
        meta = json.loads(next(p.value for p in onnx.load(
            str(tmp_path / "b.onnx"), load_external_data=False).metadata_props
            if p.key == META_KEY))
        assert max(s["repeat"] for s in meta["layout"]["sites"]) > 1   # windows per image


def test_tasks_come_and_go_without_touching_the_backbone(vit, tmp_path):
    import shutil
    src = os.path.dirname(vit["out"])
    work = tmp_path / "b"
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("*-fused.onnx"))
    path = str(work / "tasks.onnx")
    bb = str(work / backbone_location("tasks.onnx"))
    before = os.stat(bb)
    row0 = os.stat(work / row_location("tasks.onnx", 0))
    new, _ = _task(str(tmp_path), "vit", vit["base"], 9, 6, name="late")
    rep = add_tasks(path, [new], names=["late"], base_weights=vit["base"])
    assert rep.passed and rep.added == ["late"]
    assert [t["name"] for t in rep.tasks] == ["vit1", "vit2", "vit3", "late"]
    after = os.stat(bb)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert os.stat(work / row_location("tasks.onnx", 0)).st_mtime_ns == row0.st_mtime_ns
    # remove: the index is retired, never reused; the others keep theirs
    rep = remove_tasks(path, ["vit2"])
    assert [(t["name"], t["index"]) for t in task_table(path)] == \
        [("vit1", 0), ("vit3", 2), ("late", 3)]
    assert not (work / row_location("tasks.onnx", 1)).exists()
    # a removed or unknown index in a batch: NaN for that sample, the others as if alone
    runner = BundleRunner(path)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    mixed = runner(x, np.array([0, 1, 99, 3]))
    assert np.isnan(mixed[[1, 2]]).all() and np.isfinite(mixed[[0, 3]]).all()
    np.testing.assert_array_equal(mixed[[0, 3]], runner(x, np.array([0, 0, 0, 3]))[[0, 3]])
    rep = update_bundle(path, add=[_task(str(tmp_path), "vit", vit["base"], 10, 5,
                                         name="later")[0]], base_weights=vit["base"])
    assert task_table(path)[-1] == {"name": "later", "index": 4, "num_classes": 5}
    full = verify_bundle(path, base_weights=vit["base"])
    assert full.passed and full.gate.fused_checked == 4


def test_update_elsewhere_leaves_the_original_alone(vit, tmp_path):
    new, _ = _task(str(tmp_path), "vit", vit["base"], 11, 5, name="other")
    before = task_table(vit["out"])
    out = str(tmp_path / "copy" / "v2.onnx")
    rep = add_tasks(vit["out"], [new], out=out, base_weights=vit["base"], check_fused=False)
    assert rep.passed and task_table(vit["out"]) == before
    assert [t["name"] for t in task_table(out)] == ["vit1", "vit2", "vit3", "other"]
    assert verify_bundle(out, check_fused=False).passed


@pytest.mark.parametrize("case", ["other-base", "other-arch", "other-size", "duplicate-name",
                                  "not-ssf", "nan-factor"])
def test_refusals_are_one_line_and_write_nothing(vit, tmp_path, case):
    tmp = str(tmp_path)
    good = vit["tasks"][0][0]
    if case == "other-base":
        other = _task(tmp, "vit", _base(tmp, "vit", seed=1), 4, 5)[0]
        tasks, err, match = [good, other], BaseMismatchError, "trained on another base"
    elif case == "other-arch":
        other = _task(tmp, "convnext", _base(tmp, "convnext"), 4, 5)[0]
        tasks, err, match = [good, other], UsageError, "'test_convnext' task"
    elif case == "other-size":
        arch, kw, _ = ARCHS["vit"]
        m = ssf_deploy.create_base_model(arch, 5, pretrained_file=vit["base"], **kw)
        ssf_deploy.apply_method(m, "ssf")
        other = os.path.join(tmp, "size.pt")
        save_task(m, other, image_size=40)
        tasks, err, match = [good, other], UsageError, "at 40 px"
    elif case == "duplicate-name":
        tasks, err, match = [good, vit["tasks"][2][0]], UsageError, "two tasks are named 'x'"
    elif case == "not-ssf":
        arch, kw, size = ARCHS["vit"]
        m = ssf_deploy.create_base_model(arch, 5, pretrained_file=vit["base"], **kw)
        ssf_deploy.apply_method(m, "bias")
        other = os.path.join(tmp, "bias.pt")
        save_task(m, other, image_size=size)
        tasks, err, match = [good, other], UsageError, "not an SSF task"
    else:
        task = read_pack(vit["tasks"][1][0])
        key = next(k for k in task.state if k.endswith("ssf_scale"))
        task.state[key][3] = float("nan")
        tasks, err, match = [good, task], CheckpointError, "NaN"
    out = tmp_path / "out" / "tasks.onnx"
    names = ["x", "x"] if case == "duplicate-name" else None
    with pytest.raises(err, match=match) as e:
        ssf_deploy.bundle(tasks, out=str(out), names=names, base_weights=vit["base"])
    assert "\n" not in str(e.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_a_failed_gate_writes_nothing(vit, tmp_path):
    task = read_pack(vit["tasks"][1][0])
    task.extra["probe"]["logits"] = task.extra["probe"]["logits"] + 0.01   # not what trained
    out = tmp_path / "tasks.onnx"
    with pytest.raises(VerificationError) as e:
        ssf_deploy.bundle([vit["tasks"][0][0], task], out=str(out), base_weights=vit["base"])
    rep = e.value.report
    assert not rep.gate.passed
    bad = [t for t in rep.gate.tasks if not t.passed]
    assert [t.name for t in bad] == ["vit2"] and not bad[0].recorded.passed
    assert bad[0].fused.passed            # the bundle does match the task's own fused model
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_row_is_refused(vit, tmp_path):
    import shutil
    work = tmp_path / "b"
    shutil.copytree(os.path.dirname(vit["out"]), work)
    row = work / row_location("tasks.onnx", 1)
    data = bytearray(row.read_bytes())
    data[100] ^= 0xFF
    row.write_bytes(bytes(data))
    with pytest.raises(SSFDeployError, match="does not hold the row"):
        verify_bundle(str(work / "tasks.onnx"), check_fused=False)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ssf_deploy", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.slow
def test_cli_bundle_show_add_remove_verify(vit, tmp_path):
    out = str(tmp_path / "cli.onnx")
    p1, p3 = vit["tasks"][0][0], vit["tasks"][2][0]
    r = _cli("bundle", p1, p3, "--name", "a", "--name", "b", "--base-weights", vit["base"],
             "--out", out, "--fused-check", "1", "--max-classes", "8", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["gate"]["fused_checked"] == 1
    r = _cli("bundle", "--show", out)
    assert r.returncode == 0 and "a" in r.stdout and "b" in r.stdout
    r = _cli("bundle", "--into", out, vit["tasks"][1][0], "--name", "c", "--remove", "a",
             "--base-weights", vit["base"], "--quiet")
    assert r.returncode == 0, r.stderr
    assert [t["name"] for t in task_table(out)] == ["b", "c"]
    r = _cli("verify", out, "--base-weights", vit["base"])
    assert r.returncode == 0 and "PASS" in r.stdout, r.stderr
    # bad input: one line, exit 2
    r = _cli("bundle", p1, p1, "--name", "x", "--name", "x", "--out", str(tmp_path / "d.onnx"),
             "--base-weights", vit["base"])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "two tasks are named 'x'" in r.stderr and not (tmp_path / "d.onnx").exists()
    r = _cli("bundle", "--into", out, "--remove", "zzz")
    assert r.returncode == 2 and "no task named 'zzz'" in r.stderr


def test_materialized_for_tensorrt_is_the_same_model(vit):
    """What TensorRT builds from: one table initializer (spare slots for later tasks) and the
    backbone inline; onnxruntime gives the same outputs as the bundle itself."""
    import onnxruntime as ort
    from ssf_deploy.bundle.files import materialize
    proto = materialize(vit["out"], capacity=6)
    table = next(t for t in proto.graph.initializer if t.name == "bundle.table")
    assert list(table.dims)[0] == 6
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(9)).numpy()
    task = np.array([0, 2, 1, 5, -3], dtype=np.int64)     # 5: a spare slot, -3: out of range
    got = sess.run(None, {"images": x, "task": task})[0]
    want = BundleRunner(vit["out"])(x, task)
    # the same maths; the per-sample LayerNorm affine runs as Mul + Add there (float rounding)
    np.testing.assert_allclose(got[:3], want[:3], atol=1e-5, rtol=1e-5)
    assert sum(n.op_type == "LayerNormalization" and len(n.doc_string) > 0
               for n in onnx.load(vit["out"], load_external_data=False).graph.node) > 0
    assert np.isnan(got[3:]).all() and np.isnan(want[3:]).all()
    with pytest.raises(UsageError, match="capacity 2 is below"):
        materialize(vit["out"], capacity=2)


# ---------------------------------------------------------------------------------- TensorRT


def test_engine_feeds_are_mixed_probe_batches_the_materialized_graph_reproduces(vit):
    """What the bundle engine is compared on (CPU part): the tasks' own probe images in mixed
    batches; the graph TensorRT parses gives the bundle's outputs on them."""
    import onnxruntime as ort
    from ssf_deploy.bundle.engine import gate_feeds
    from ssf_deploy.bundle.files import materialize, read_graph
    _, meta = read_graph(vit["out"])
    feeds = gate_feeds(meta, batch=5)
    assert sum(f["task"].numel() for f in feeds) == 12          # 3 tasks x 4 probe images
    assert all(len(set(f["task"].tolist())) > 1 for f in feeds)  # mixed
    sess = ort.InferenceSession(materialize(vit["out"]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    runner = BundleRunner(vit["out"])
    for f in feeds:
        got = sess.run(None, {"images": f["images"].numpy(), "task": f["task"].numpy()})[0]
        np.testing.assert_allclose(got, runner(f["images"], f["task"]), atol=1e-5, rtol=1e-5)


def test_engine_refusals_before_tensorrt(vit, tmp_path):
    from ssf_deploy.bundle.engine import build_bundle_engine, refit_bundle_engine
    with pytest.raises(UsageError, match="`capacity` 2 is below the bundle's 3 task slots"):
        build_bundle_engine(vit["out"], str(tmp_path / "b.plan"), capacity=2)
    plan = tmp_path / "plain.plan"
    plan.write_bytes(b"not an engine")
    (tmp_path / "plain.plan.json").write_text(json.dumps({"format": "ssf-deploy/engine/1"}))
    with pytest.raises(UsageError, match="not built from a task bundle"):
        refit_bundle_engine(str(plan), vit["out"])
    if not _has_tensorrt():
        with pytest.raises(SSFDeployError, match=r'pip install "ssf-deploy\[tensorrt\]"'):
            build_bundle_engine(vit["out"], str(tmp_path / "b.plan"))
        assert not (tmp_path / "b.plan").exists()


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_bundle_engine_serves_every_task_and_takes_new_ones_by_refit(vit, tmp_path):
    """On a GPU with TensorRT: one engine for every task (mixed batches, each task against its
    recorded outputs), then a task added to the bundle reaches the engine by refit."""
    import shutil
    from ssf_deploy.bundle.engine import build_bundle_engine, refit_bundle_engine
    work = tmp_path / "b"
    shutil.copytree(os.path.dirname(vit["out"]), work,
                    ignore=shutil.ignore_patterns("*-fused.onnx"))
    path = str(work / "tasks.onnx")
    plan = str(tmp_path / "tasks.plan")
    rep = build_bundle_engine(path, plan, capacity=5, opt_batch=4, max_batch=16, iters=5)
    assert rep.passed and rep.gate.worst("recorded") < 1e-4 and os.path.isfile(plan)
    new, _ = _task(str(tmp_path), "vit", vit["base"], 12, 6, name="gpu-late")
    add_tasks(path, [new], base_weights=vit["base"])
    rep = refit_bundle_engine(plan, path)
    assert rep.passed and "gpu-late" in rep.tasks and rep.refit["weights"] >= 1
    for extra in range(2):        # two more slots than the engine has: refused in one line
        add_tasks(path, [_task(str(tmp_path), "vit", vit["base"], 20 + extra, 5,
                               name=f"x{extra}")[0]], base_weights=vit["base"],
                  check_fused=False)
    with pytest.raises(UsageError, match="larger `capacity`"):
        refit_bundle_engine(plan, path)
