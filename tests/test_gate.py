"""The CI gate from Python: ``check_deployment`` is what ``ssf-deploy verify`` runs."""
from __future__ import annotations

import pytest
import torch

import ssf_deploy
from ssf_deploy.errors import VerificationError
from ssf_deploy.export import export_onnx
from ssf_deploy.formats.checkpoint import save_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    m = ssf_deploy.create_base_model("test_vit", 5, init_seed=0, img_size=32, patch_size=8)
    ssf_deploy.apply_method(m, "ssf", init_std=0.2)
    path = str(tmp / "t.pt")
    save_task(m, path, image_size=32)
    model = ssf_deploy.build_model(ssf_deploy.read_task(path))
    onnx_path = str(tmp / "m.onnx")
    x = torch.randn(2, 3, 32, 32)
    export_onnx(ssf_deploy.fuse(model, x), onnx_path, example=x[:1], dynamic_batch=True)
    return model, onnx_path


def test_the_gate_checks_fused_and_onnx_against_the_rebuild_and_the_record(tuned):
    model, onnx_path = tuned
    x = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    report = ssf_deploy.check_deployment(model, x, onnx=onnx_path)
    assert report.passed
    pairs = [(r.candidate, r.reference.split(" (")[0]) for r in report.reports]
    assert ("unfused (rebuilt)", "recorded at training") in pairs
    assert ("fused (onnxruntime)", "unfused") in pairs
    assert report.anchor["probe"] == "recorded"


def test_a_model_that_is_not_the_trained_one_fails_with_its_report(tuned):
    model, onnx_path = tuned
    import copy
    other = copy.deepcopy(model)
    with torch.no_grad():                 # another task: every shift moved
        for n, p in other.named_parameters():
            if n.endswith("ssf_shift"):
                p.add_(0.5)
    with pytest.raises(VerificationError, match="does not match the trained one") as e:
        ssf_deploy.check_deployment(other, [torch.randn(2, 3, 32, 32)], onnx=onnx_path)
    failed = e.value.report.failed
    assert "unfused (rebuilt) vs recorded at training (golden probe)" in failed[0]
    assert any("onnxruntime" in f for f in failed)     # the ONNX is task A, not this model
