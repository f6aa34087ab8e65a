"""The runtime I/O layer: one image walk, one ONNX loader, one input-spec reader, one session
factory, one timing loop, one key diff — against timm, onnx and onnxruntime themselves."""
from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper
from PIL import Image

from ssf_deploy.errors import CheckpointError, SSFDeployError, UsageError
from ssf_deploy.fileio import OutputSet
from ssf_deploy.runtime import (IMAGE_EXTS, ImageBatches, OrtRunner, data_config, eval_transform,
                                graph_inputs, image_files, interleaved, key_diff, load_images,
                                load_onnx, ort_session, time_calls)


def _images(folder, exts, size=40):
    g = np.random.default_rng(0)
    for i, ext in enumerate(exts):
        sub = folder / f"c{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}{ext}")
    (folder / "notes.txt").write_text("not an image")
    return str(folder)


def test_one_walk_reads_every_extension_the_tools_read(tmp_path):
    """quantize accepted .tif and .gif, engine/fuse did not: one list now, for every tool."""
    folder = _images(tmp_path / "imgs", [".png", ".jpg", ".tif", ".gif", ".bmp", ".PNG"])
    files = image_files(folder)
    assert len(files) == 6 and files == sorted(files)
    assert {os.path.splitext(f)[1].lower() for f in files} <= set(IMAGE_EXTS)
    assert ".tif" in IMAGE_EXTS and ".webp" in IMAGE_EXTS
    link = tmp_path / "linked"
    link.mkdir()
    os.symlink(os.path.join(folder, "c0"), link / "c0")      # class folders as symlinks
    assert len(image_files(str(link))) == 3


def test_eval_transform_is_timms(tmp_path):
    folder = _images(tmp_path / "imgs", [".png"] * 5)
    with torch.device("meta"):
        m = timm.create_model("test_vit")
    want_cfg = timm.data.resolve_data_config({}, model=m)
    want_cfg["input_size"] = (3, 32, 32)
    assert data_config("test_vit", chw=(3, 32, 32)) == want_cfg
    tf = timm.data.create_transform(**want_cfg, is_training=False)
    with Image.open(image_files(folder)[0]) as img:
        want = tf(img.convert("RGB"))
    batches = list(ImageBatches(folder, eval_transform("test_vit", chw=(3, 32, 32)), 2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 32, 32)] * 2    # the 5th is dropped
    torch.testing.assert_close(batches[0][0], want)
    with pytest.raises(UsageError, match="fewer than one batch"):
        ImageBatches(folder, tf, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images"):
        ImageBatches(str(tmp_path / "empty"), tf, 1)
    with pytest.raises(UsageError, match="unknown timm model 'no_such_net'"):
        eval_transform("no_such_net")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    with pytest.raises(CheckpointError, match="cannot read image .*x.png") as e:
        load_images(image_files(str(bad)), tf)
    assert e.value.__cause__ is not None                   # the cause is kept (--debug)


def _two_inputs(path=None):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 2])
    t = helper.make_tensor_value_info("task", TensorProto.INT64, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    nodes = [helper.make_node("Cast", ["task"], ["tf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["tf", "one"], ["t2"]),
             helper.make_node("Mul", ["images", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "t2"], ["y"])]
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    m = helper.make_model(helper.make_graph(nodes, "g", [x, t], [y], [w, one]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    if path:
        onnx.save(m, path)
    return m


def test_one_loader_checks_manifests_and_says_one_line(tmp_path):
    path = str(tmp_path / "m.onnx")
    with OutputSet() as outs:          # written as a set: a manifest lists it
        onnx.save(_two_inputs(), outs.add(path))
        with open(outs.add(str(tmp_path / "other.bin")), "wb") as f:
            f.write(b"x")
    assert load_onnx(path).graph.node
    with open(path, "ab") as f:        # changed after its set was committed
        f.write(b"\0")
    with pytest.raises(SSFDeployError, match="manifest|sha256|does not match"):
        load_onnx(path)
    with pytest.raises(UsageError, match="ONNX file not found"):
        load_onnx(str(tmp_path / "none.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08garbage")
    with pytest.raises(CheckpointError, match="cannot read ONNX"):
        load_onnx(str(bad))
    with pytest.raises(SSFDeployError, match="ONNX file not found"):
        ort_session(str(tmp_path / "none.onnx"))


def test_input_specs_name_every_input():
    specs = graph_inputs(_two_inputs())
    assert [(s.name, s.shape, s.dims, s.dtype) for s in specs] == [
        ("images", (None, 2), ("batch", 2), np.dtype("float32")),
        ("task", (None,), ("batch",), np.dtype("int64"))]      # initializers are not inputs
    assert graph_inputs(_two_inputs(), "task")[0].dynamic == (0,)
    with pytest.raises(UsageError, match="no input 'labels'"):
        graph_inputs(_two_inputs(), "labels")


def test_runner_takes_inputs_by_position_mapping_or_name(tmp_path):
    path = str(tmp_path / "two.onnx")
    _two_inputs(path)
    r = OrtRunner(path, providers=["CPUExecutionProvider"])
    x, t = torch.tensor([[1.0, 1.0], [2.0, 0.5]], dtype=torch.float64), torch.tensor([0, 3])
    want = torch.tensor([[1.0, 2.0], [5.0, 4.0]])
    for out in (r(x, t), r({"images": x, "task": t}), r(images=x, task=t)):
        torch.testing.assert_close(out[0], want)
    assert r.inputs == ["images", "task"] and r.providers == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="missing model input"):
        r(x)
    # initializers overriding the file's: run unoptimized unless asked otherwise
    over = OrtRunner(path, initializers={"w": np.array([0.0, 0.0], np.float32)})
    torch.testing.assert_close(over(x, t)[0], torch.tensor([[0.0, 0.0], [3.0, 3.0]]))
    assert over.session.get_session_options().graph_optimization_level.name == "ORT_DISABLE_ALL"
    with pytest.raises(UsageError, match="`optimization`"):
        ort_session(path, optimization="max")


def test_one_timing_loop():
    calls = []
    t = time_calls(lambda: (calls.append(1), time.sleep(0.002)), 4, warmup=2)
    assert len(calls) == 6 and len(t.ms) == 4 and t.first_ms is not None
    assert all(1.5 <= ms < 1000 for ms in t.ms)          # the sleep is inside what is timed
    s = t.summary()
    assert s["iters"] == 4 and s["min_ms"] <= s["median_ms"] <= s["p90_ms"]
    order = []
    res = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b"),
                       "c": lambda: order.append("c")}, 3, warmup=1)
    assert order[:3] == ["a", "b", "c"]                   # warm-up
    assert order[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]   # rotated rounds
    assert {k: len(v.ms) for k, v in res.items()} == {"a": 3, "b": 3, "c": 3}


def test_one_key_diff():
    own = {"a": torch.zeros(2), "b": torch.zeros(3), "head": torch.zeros(4)}
    given = {"a": torch.zeros(5), "c": torch.zeros(1), "head": torch.zeros(9)}
    d = key_diff(own, given)
    assert d.missing == ["b"] and d.unexpected == ["c"]
    assert d.wrong_shape == [("a", (2,), (5,)), ("head", (4,), (9,))]
    assert d.summary() == "1 missing, 1 unexpected, 2 wrong-shaped key(s) (first missing: 'b')"
    d = key_diff(own, given, ignore=["head", "b"])
    assert d.wrong_shape == [("a", (2,), (5,))] and not d.missing
    assert not key_diff(own, dict(own)) and d
    assert d.listing(["x", "y", "z", "w"]) == "x, y, z ..."



_TRIM_SCENARIO = """
import sys
from ssf_deploy.runtime import release_freed_memory

def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024

probe = bytearray(512 * 1024)
del probe                        # a freed mmapped block raises glibc's mmap threshold
blocks = [bytearray(512 * 1024) for _ in range(300)]
for b in blocks:                 # touch every page: resident
    b[::4096] = b"\\x01" * len(range(0, len(b), 4096))
pin = bytearray(256 * 1024)      # a live block above them: the heap top cannot shrink
pin[::4096] = b"\\x01" * len(range(0, len(pin), 4096))
del blocks
before = rss()
if sys.argv[1] == "trim":
    release_freed_memory()
print(before - rss())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                    reason="glibc heap trimming, read through /proc: Linux only")
def test_release_freed_memory_gives_freed_heap_blocks_back():
    """onnxruntime frees a bundle's ~0.5 MB row blocks after folding them into one table; glibc
    keeps such freed blocks in the heap (its mmap threshold grows to their size), so without
    a trim the table would be resident twice. Here, in a fresh process (a known heap): 150 MB
    of 512 kB blocks freed under a live block stay resident, until the trim the session
    factory makes."""
    import subprocess
    import sys
    drop = {}
    for mode in ("keep", "trim"):
        r = subprocess.run([sys.executable, "-c", _TRIM_SCENARIO, mode], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        drop[mode] = float(r.stdout.split()[-1])
    assert drop["keep"] < 50 and drop["trim"] > 100, drop
