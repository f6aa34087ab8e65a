"""``ssf-deploy bench``: schema, table, passes, isolation, Table-2 formulas, warnings, bad input.

Everything runs on tiny models; performance targets live in benchmarks/, never here.
"""
from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torch.nn.functional as F

from ssf_deploy import bench as B
from ssf_deploy.errors import UsageError
from ssf_deploy.models import count_params
from ssf_deploy.tools import main

from conftest import has_tensorrt

TINY = ["--model", "test_vit", "--model-kwargs", '{"patch_size": 8}', "--image-size", "32",
        "--num-classes", "5", "--batch-size", "2", "--iters", "2", "--warmup", "1",
        "--device", "cpu"]


def tiny_cfg(**kw) -> B.BenchConfig:
    base = dict(arch="test_vit", num_classes=5, batch_size=4, image_size=32, device="cpu",
                warmup=1, iters=2, model_kwargs={"patch_size": 8})
    base.update(kw)
    return B.BenchConfig(**base)


def test_cli_json_flag_out_file_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", *TINY, "--method", "vpt-deep", "--prompts", "4", "--no-isolate",
               "--json", "--out", str(out), "--plot", str(png)])
    captured = capsys.readouterr()
    assert rc == 0
    report = json.loads(captured.out)            # --json: stdout is the report and only that
    assert json.loads(out.read_text()) == report  # --out: the same report, in a file
    assert report["model"] == "test_vit" and report["device"] == "cpu"
    assert report["batch_size"] == 2 and report["repeat"] == 1
    assert "targets" not in report                # targets live in benchmarks/
    for key in ("loadavg_start", "loadavg_end", "cores", "busy_threshold", "warnings"):
        assert key in report
    rows = {r["method"]: r for r in report["results"]}
    # the asked method comes with the references every ratio needs, from the same run
    assert list(rows) == ["base", "full", "vpt-deep", "ssf", "frozen", "ssf-fused"]
    for r in report["results"]:
        assert set(B.SCHEMA_KEYS) <= set(r)
        assert r["inference_params"] > 0 and r["inference_flops"] > 0
        assert r["infer_ms"] > 0 and r["infer_peak_mem_mb"] is not None
    for m in ("full", "vpt-deep", "ssf", "frozen"):
        # in-process CPU memory (--no-isolate) has no baseline to trust: present, not checked
        assert rows[m]["train_step_ms"] > 0 and rows[m]["train_peak_mem_mb"] is not None
        assert rows[m]["saved_for_backward_mb"] > 0
        assert len(rows[m]["train_step_ms_all"]) == 2
    for m in ("base", "ssf-fused"):   # inference-only rows
        assert rows[m]["train_step_ms"] is None and rows[m]["trainable_params"] is None
    assert rows["full"]["trainable_params"] == rows["base"]["inference_params"]
    assert rows["frozen"]["trainable_params"] == 0
    assert rows["ssf-fused"]["inference_params"] == rows["base"]["inference_params"]
    assert rows["ssf-fused"]["inference_flops"] == rows["base"]["inference_flops"]
    assert {s["keeps"] for s in rows["ssf"]["ssf_sites"]} >= {"norm", "y-shared", "residual"}
    assert report["table2"]["rows"]
    # progress went to stderr, one line per pass (not a terminal here)
    err = captured.err.splitlines()
    n = len(B.plan(list(rows)))
    assert sum(line.startswith("bench [") for line in err) == n
    assert any(f"[{n}/{n}]" in line and "elapsed" in line for line in err)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_shows_ratios_against_frozen_and_full(tmp_path, capsys):
    rc = main(["bench", *TINY, "--method", "ssf-naive", "--no-isolate", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    header = next(line for line in text.splitlines() if line.startswith("method"))
    assert header.split()[:8] == ["method", "train", "M", "infer", "M", "GFLOPs", "train", "ms"]
    assert "/frozen" in header and "/full" in header and "/base" in header
    frozen = next(line for line in text.splitlines() if line.startswith("frozen "))
    assert "1.00x" in frozen
    assert "load average" in text and "ssf sites:" in text and "Table 2 check" in text


def test_plan_interleaves_rounds_and_measures_memory_apart():
    rows = B.resolve_methods("ssf")
    passes = B.plan(rows, repeat=2)
    assert passes[0].task == "fuse"
    timing = [(p.row, p.task, p.round) for p in passes if p.task.endswith("time")]
    one_round = [(r, t) for r, t, k in timing if k == 0]
    assert [(r, t) for r, t, k in timing if k == 1] == one_round   # A B C A B C
    assert timing[:len(one_round)] == [(r, t, 0) for r, t in one_round]
    memory = [p for p in passes if p.task.endswith("memory")]
    assert passes[-len(memory):] == memory                        # after every timing pass
    assert {p.row for p in memory} == set(rows)


def test_repeat_reports_the_median_of_round_medians(capsys):
    report = B.run_bench(tiny_cfg(iters=1), ["base", "full", "frozen"], isolate=False,
                         progress=False, repeat=3)
    full = report["results"][1]
    assert len(full["train_step_ms_rounds"]) == 3 and len(full["train_step_ms_all"]) == 3
    assert full["train_step_ms"] == sorted(full["train_step_ms_rounds"])[1]
    assert report["repeat"] == 3


@pytest.mark.slow
def test_isolated_passes_run_in_fresh_processes_with_their_own_allocator():
    cfg = tiny_cfg(batch_size=2, iters=1)
    mem = B.isolate.run_isolated(cfg, "frozen", "train-memory")
    assert mem["trainable_params"] == 0 and mem["train_peak_mem_mb"] > 0
    assert mem["saved_for_backward_mb"] > 0 and "train_step_ms_all" not in mem
    t = B.isolate.run_isolated(cfg, "frozen", "train-time")
    assert len(t["train_step_ms_all"]) == 1 and "train_peak_mem_mb" not in t


def test_timing_children_get_the_normal_allocator_and_this_package(monkeypatch):
    from ssf_deploy.bench import isolate
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    timing, memory = isolate.child_env(False), isolate.child_env(True)
    assert "MALLOC_MMAP_THRESHOLD_" not in timing
    assert memory["MALLOC_MMAP_THRESHOLD_"] == "65536"
    import ssf_deploy
    root = os.path.dirname(os.path.dirname(os.path.abspath(ssf_deploy.__file__)))
    for env in (timing, memory):
        assert env["PYTHONPATH"].split(os.pathsep) == [root, "/somewhere/else"]


def test_ssf_fused_is_the_base_architecture_loaded_from_a_file(tmp_path):
    from ssf_deploy.bench.rows import fuse_to_file
    from ssf_deploy.fuse import fuse
    cfg = tiny_cfg()
    path = str(tmp_path / "fused.safetensors")
    fuse_to_file(cfg, path)
    train, make = B.build_row(cfg, "ssf-fused", fused_weights=path)
    fused = make().eval()
    assert train is None and not hasattr(fused, "ssf_deploy_method")
    assert not any("ssf_" in k for k in fused.state_dict())
    _, make_base = B.build_row(cfg, "base")
    base = make_base()
    x = torch.randn(1, 3, 32, 32)
    assert count_params(fused)[1] == count_params(base)[1]
    assert B.count_flops(fused, x) == B.count_flops(base, x)
    _, make_ssf = B.build_row(cfg, "ssf")
    with torch.no_grad():   # the same weights the in-process fuse produces
        torch.testing.assert_close(fused(x), fuse(make_ssf())(x))


def test_all_rows_include_naive_and_frozen():
    rows = B.resolve_methods("all")
    assert rows == list(B.ROWS)
    assert {"ssf-naive", "frozen", "ssf-fused", "base"} <= set(rows)
    assert B.resolve_methods("adapter") == ["base", "full", "adapter", "ssf", "frozen",
                                            "ssf-fused"]


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


def test_ssf_unfused_costs_flops_fused_does_not():
    cfg = tiny_cfg()
    base = B.build_row(cfg, "base")[1]()
    fused = B.build_row(cfg, "ssf-fused")[1]()   # fused in this process (library use)
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
    x, y = B.inputs(cfg, model, 4, "cpu")
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


def test_noise_warnings_name_the_busy_machine_and_the_noisy_row():
    from ssf_deploy.bench.noise import noise_warnings
    assert B.spread([100.0, 110.0, 125.0]) == pytest.approx(0.25 / 1.1)
    assert B.spread([100.0]) is None
    quiet = {"busy_threshold": 1.0, "cores": 2, "loadavg_start": [0.2, 0.3, 0.4],
             "others_cpu_start": 0.05, "others_cpu_max": 0.1,
             "results": [{"method": "full", "train_step_spread": 0.05}]}
    assert noise_warnings(quiet) == []
    busy = dict(quiet, loadavg_start=[3.5, 2, 2], others_cpu_start=1.2, others_cpu_max=1.7,
                results=[{"method": "ssf-fused", "infer_spread": 19.6}])
    text = "\n".join(noise_warnings(busy))
    assert "other processes used 1.20 cores" in text and "load average 3.50" in text
    assert "up to 1.70 cores during a timing pass" in text
    assert "ssf-fused: inference times spread 1960%" in text and "--repeat" in text
    just_ended = dict(quiet, loadavg_start=[1.8, 1, 1])
    assert "work that had just ended" in "\n".join(noise_warnings(just_ended))
    # a row whose inference is base's copies base's spread: warned once, under base
    copied = dict(quiet, results=[{"method": "base", "infer_spread": 0.3},
                                  {"method": "full", "infer_spread": 0.3,
                                   "infer_same_as": "base"}])
    w = noise_warnings(copied)
    assert [x.split(":")[0] for x in w if "spread" in x] == ["base"]
    assert "--repeat 3" in w[-1]
    assert "--repeat above 3" in noise_warnings(dict(copied, repeat=3))[-1]


def test_a_long_cpu_run_says_how_long_and_how_to_shorten_it(monkeypatch):
    from ssf_deploy.bench import progress, run
    from ssf_deploy.bench.rows import BenchConfig
    cfg = BenchConfig(arch="vit_base_patch16_224", device="cpu", iters=5, warmup=1)
    passes = B.plan(B.resolve_methods("vpt-deep"))
    total = progress.estimate_costs(cfg, passes, isolated=True)
    assert total > progress.LONG_RUN_S   # ViT-B/16 training on a CPU: minutes, not seconds
    monkeypatch.setattr(run, "estimate_costs", lambda *a, **k: 600.0)
    buf = io.StringIO()
    B.run_bench(tiny_cfg(iters=1), ["base", "full", "frozen"], isolate=False, stream=buf)
    text = buf.getvalue()
    assert "roughly 10m00s" in text and run.shorter_run_hint("test_vit") in text
    assert "--batch-size" in text and "--iters" in text
    # a smaller model is suggested only where there is one
    assert "--model vit_small_patch16_224 or vit_tiny_patch16_224" in \
        run.shorter_run_hint("vit_base_patch16_224")
    assert "(--model vit_tiny_patch16_224)" in run.shorter_run_hint("vit_small_patch16_224")
    assert "--model" not in run.shorter_run_hint("vit_tiny_patch16_224")


def test_onnxruntime_on_cuda_needs_the_cuda_provider(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from ssf_deploy.bench.backends import ort_session
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="onnxruntime-gpu"):
            B.check_backend("onnxruntime", "cuda:0")

    class FellBack:   # what a CPU wheel (or broken CUDA libs) does: silently runs on the CPU
        def __init__(self, model, sess_options=None, providers=None):
            self.asked = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    with pytest.raises(UsageError, match="not CUDAExecutionProvider"):
        ort_session(b"model bytes", torch.device("cuda", 1))
    assert ort_session(b"model bytes", torch.device("cpu")).asked == ["CPUExecutionProvider"]


def _one_line_error(capsys, argv, needle):
    rc = main(["bench", *TINY, *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and needle in err


def test_unknown_method_is_one_line(capsys):
    _one_line_error(capsys, ["--method", "lora"], "unknown method 'lora'")


def test_bad_device_is_one_line(capsys):
    _one_line_error(capsys, ["--device", "tpu"], "device")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["--device", "cuda"], "CUDA is not available")


def test_bad_backend_is_one_line(capsys):
    _one_line_error(capsys, ["--backend", "openvino"], "unknown backend")


def test_bad_numbers_are_one_line(capsys):
    _one_line_error(capsys, ["--repeat", "0"], "--repeat must be >= 1")
    _one_line_error(capsys, ["--iters", "0"], "--iters must be >= 1")


def test_json_is_a_flag_and_takes_no_file(capsys, tmp_path):
    _one_line_error(capsys, ["--json", str(tmp_path / "x.json")], "unexpected extra argument")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(has_tensorrt(), reason="TensorRT is installed: the hint does not apply")
def test_tensorrt_without_tensorrt_names_the_extra(capsys):
    _one_line_error(capsys, ["--backend", "tensorrt"], 'pip install "ssf-deploy[tensorrt]"')


def test_cpu_peak_meter_sees_a_known_allocation():
    """The CPU meter (VmHWM since the reset, minus the baseline) against an allocation of known
    size: 64 MiB touched, freed before reading, must show as at least 60 MiB and well under
    twice that (a 64 MiB block is mmap'ed by glibc whatever its thresholds, so it leaves the
    resident set on free)."""
    from ssf_deploy.bench.meters import MB, Peak
    peak = Peak(torch.device("cpu"))
    peak.reset()
    x = torch.ones(16 * 1024 * 1024)            # 64 MiB of float32, every page written
    del x
    got = peak.peak() / MB
    assert 60 <= got < 128, got
    peak.reset()
    assert peak.peak() / MB < 60                # the reset forgets the earlier high-water mark
