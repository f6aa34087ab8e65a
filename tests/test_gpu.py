"""GPU-only checks, run whenever a CUDA machine is available (skipped otherwise, see conftest)."""
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_train_amp_on_cuda(tmp_path, monkeypatch):
    """fp16 autocast training on CUDA writes a checkpoint whose task, rebuilt on the CPU in
    fp32, reproduces the golden outputs recorded from the CUDA-trained weights: the weights
    that left the GPU are the ones that were trained."""
    import math
    monkeypatch.setenv("SSF_DEPLOY_CACHE", str(tmp_path / "cache"))
    from ssf_deploy.anchor import golden_of
    from ssf_deploy.formats import build_model, read_task
    from ssf_deploy.train import TrainConfig, train
    res = train(TrainConfig(arch="test_vit", model_kwargs={"img_size": 32, "patch_size": 8},
                            method="ssf", dataset="builtin", epochs=1, batch_size=16,
                            max_steps_per_epoch=3, device="cuda", amp=True,
                            out=str(tmp_path / "c.pt"), progress=False, verbose=False))
    assert res.metrics["loss"] and all(math.isfinite(v) for v in res.metrics["loss"])
    model = build_model(read_task(res.checkpoint))          # CPU, fp32, base from its seed
    golden = golden_of(model)
    assert golden is not None
    report = golden.check(model, "rebuilt on the CPU", atol=1e-4, rtol=1e-3)
    assert report.passed, str(report)


def test_bench_cuda_events_and_memory():
    from ssf_deploy import bench as B
    cfg = B.BenchConfig(arch="test_vit", model_kwargs={"img_size": 32, "patch_size": 8},
                        num_classes=5, batch_size=8, image_size=32, device="cuda", amp=True,
                        warmup=2, iters=3)
    report = B.run_bench(cfg, ["base", "full", "ssf", "ssf-fused"], progress=False)
    rows = {r["method"]: r for r in report["results"]}
    assert rows["ssf"]["train_peak_mem_mb"] > 0 and rows["full"]["train_step_ms"] > 0
    assert rows["ssf-fused"]["inference_params"] == rows["base"]["inference_params"]


def test_verify_fp16_on_cuda(tmp_path):
    import ssf_deploy as sd
    from ssf_deploy.fuse import fuse
    from ssf_deploy.verify import FP16_ATOL, FP16_RTOL, verify
    model = sd.create_base_model("test_convnext", 5)
    sd.apply_method(model, "ssf", init_std=0.2)
    model = model.eval().cuda()
    fused = fuse(model).half()
    r = verify(model, lambda x: fused(x.half()).float(), torch.randn(4, 3, 32, 32, device="cuda"),
               atol=FP16_ATOL, rtol=FP16_RTOL)
    assert r.passed, str(r)
