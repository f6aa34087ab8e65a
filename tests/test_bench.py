"""``ssf-deploy bench``: schema, table, Table-2 formulas, lean-vs-naive SSF autograd, bad input.

Everything runs on tiny models; performance targets live in benchmarks/, never here.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ssf_deploy import bench as B
from ssf_deploy.models import count_params
from ssf_deploy.tools import main
from ssf_deploy.tuners import apply_method

from conftest import has_tensorrt, image_size, make_model

TINY = ["--model", "test_vit", "--model-kwargs", '{"patch_size": 8}', "--image-size", "32",
        "--num-classes", "5", "--batch-size", "2", "--iters", "1", "--warmup", "1",
        "--device", "cpu"]


def tiny_cfg(**kw) -> B.BenchConfig:
    base = dict(arch="test_vit", num_classes=5, batch_size=4, image_size=32, device="cpu",
                warmup=1, iters=2, model_kwargs={"patch_size": 8})
    base.update(kw)
    return B.BenchConfig(**base)


def _has_fuse() -> bool:
    try:
        from ssf_deploy.fuse import fuse  # noqa: F401
    except ImportError:
        return False
    return True


needs_fuse = pytest.mark.skipif(not _has_fuse(), reason="ssf_deploy.fuse is not in this tree yet")


@needs_fuse
def test_cli_json_schema_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", *TINY, "--method", "vpt-deep", "--prompts", "4", "--no-isolate",
               "--json", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("model", "device", "batch_size"):
        assert key in report
    assert report["model"] == "test_vit" and report["device"] == "cpu"
    assert report["batch_size"] == 2
    rows = {r["method"]: r for r in report["results"]}
    # the asked method comes with the references every ratio needs, from the same run
    assert list(rows) == ["base", "full", "vpt-deep", "ssf", "ssf-fused"]
    for r in report["results"]:
        assert set(B.SCHEMA_KEYS) <= set(r)
        assert r["inference_params"] > 0 and r["inference_flops"] > 0
        assert r["infer_ms"] > 0 and r["infer_peak_mem_mb"] is not None
    for m in ("full", "vpt-deep", "ssf"):
        assert rows[m]["train_step_ms"] > 0 and rows[m]["train_peak_mem_mb"] > 0
        assert rows[m]["saved_for_backward_mb"] > 0
        assert rows[m]["trainable_params"] > 0
    for m in ("base", "ssf-fused"):   # inference-only rows
        assert rows[m]["train_step_ms"] is None and rows[m]["trainable_params"] is None
    assert rows["full"]["trainable_params"] == rows["base"]["inference_params"]
    assert rows["vpt-deep"]["trainable_params"] < rows["full"]["trainable_params"]
    assert report["table2"]["rows"] and report["targets"] is not None
    assert "method" in text and "Table 2 check" in text and "Lean SSF targets" in text
    for m in rows:
        assert any(line.startswith(m + " ") for line in text.splitlines())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_rows_include_naive_and_frozen():
    rows = B.resolve_methods("all")
    assert rows == list(B.ROWS)
    assert {"ssf-naive", "frozen", "ssf-fused", "base"} <= set(rows)
    assert B.resolve_methods("adapter") == ["base", "full", "adapter", "ssf", "ssf-fused"]


def test_isolated_row_runs_in_a_fresh_process():
    res = B._in_subprocess(tiny_cfg(batch_size=2, iters=1), "frozen", False)
    assert res["method"] == "frozen" and res["trainable_params"] == 0
    assert res["train_peak_mem_mb"] > 0 and res["saved_for_backward_mb"] > 0
    assert res["infer_ms"] is None   # inference of a base-graph row is base's, not re-run


@pytest.mark.parametrize("method", ["adapter", "vpt-shallow", "vpt-deep", "ssf"])
def test_table2_params_match_formula_exactly(method):
    cfg = tiny_cfg(prompts=7, adapter_dim=5)
    formula = B.table2_formulas(cfg, B.vit_geometry(cfg))[method]
    base = count_params(B.build_row(cfg, "base")[1]())[1]
    model = B.build_row(cfg, method)[1]()
    extra = count_params(model)[1] - base
    assert extra == formula["params_exact"]
    if method.startswith("vpt"):   # the paper's formula is exact for prompts
        assert extra == formula["params"]
    # the tuned parameters are exactly the extra ones plus the trainable head
    head = sum(p.numel() for p in model.get_classifier().parameters())
    assert count_params(model)[0] == extra + head


@needs_fuse
def test_ssf_fused_has_no_extra_params_or_flops():
    cfg = tiny_cfg()
    base = B.build_row(cfg, "base")[1]()
    fused = B.build_row(cfg, "ssf-fused")[1]()
    unfused = B.build_row(cfg, "ssf")[1]()
    x = torch.randn(1, 3, 32, 32)
    assert count_params(fused)[1] == count_params(base)[1]
    assert B.count_flops(fused, x) == B.count_flops(base, x)
    # unfused SSF costs one mul and one add per scaled element: Table 2's mN^2Ld (+ embed/final)
    assert B.count_flops(unfused, x) > B.count_flops(base, x)


def _saved(row: str) -> int:
    cfg = tiny_cfg()
    model, _ = B.build_row(cfg, row)
    model.train()
    x, y = B._inputs(cfg, model, 4, "cpu")
    F.cross_entropy(model(x), y).backward()   # first step settles the lean policy
    with B.saved_for_backward(model) as saved:
        loss = F.cross_entropy(model(x), y)
    del loss
    return saved["total"]


def test_lean_ssf_saves_less_for_backward_than_naive():
    assert _saved("ssf") < _saved("ssf-naive")


def test_saved_bytes_count_each_storage_once():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(8, 64, requires_grad=True)
    with B.saved_for_backward() as saved:
        y = (x @ w) @ w   # w is saved twice, x and x@w once each
    assert saved["total"] == (64 * 64 + 2 * 8 * 64) * 4
    del y


def _one_line_error(capsys, argv, needle):
    rc = main(["bench", *TINY, *argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert needle in err


def test_unknown_method_is_one_line(capsys):
    _one_line_error(capsys, ["--method", "lora"], "unknown method 'lora'")


def test_bad_device_is_one_line(capsys):
    _one_line_error(capsys, ["--device", "tpu"], "device")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["--device", "cuda"], "CUDA is not available")


def test_bad_backend_is_one_line(capsys):
    _one_line_error(capsys, ["--backend", "openvino"], "unknown backend")


@pytest.mark.skipif(has_tensorrt(), reason="TensorRT is installed: the hint does not apply")
def test_tensorrt_without_tensorrt_names_the_extra(capsys):
    _one_line_error(capsys, ["--backend", "tensorrt"], 'pip install "ssf-deploy[tensorrt]"')
