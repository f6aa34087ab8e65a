"""What a PASS is anchored to: the task's golden probe (outputs recorded at training, and the
inputs they were recorded on) and the base check. Used by deploy, refit, engine and verify alike:
each candidate (fused model, onnxruntime session, TensorRT engine, refitted engine) is compared
with what was *recorded*, never only with a reconstruction."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .formats.provenance import checked_probe_inputs
from .formats.task import provenance_of
from .models import batch_len, batch_slice, input_extent, sample_shape
from .verify import VerifyReport, compare, run_outputs

__all__ = ["GoldenProbe", "anchor_of", "golden_of", "check_golden"]


class GoldenProbe:
    """A task's recorded outputs and the inputs they were recorded on, as one comparison.

    ``check(candidate)`` runs any model or runner on the probe inputs (one sample at a time when
    ``per_sample``, for static-batch ONNX) and compares with what was *recorded*, not with a
    reconstruction.
    """

    def __init__(self, probe: dict):
        self.inputs = checked_probe_inputs(probe)
        self.logits = probe["logits"].float().numpy()
        self.recorded = probe.get("recorded", "at training")

    @property
    def image_size(self) -> int:
        return input_extent(self.inputs)   # image size, or a text probe's sequence length

    def check(self, candidate, name: str, *, atol: float, rtol: float,
              per_sample: bool = False) -> VerifyReport:
        n = batch_len(self.inputs)
        batches = [batch_slice(self.inputs, i, i + 1) for i in range(n)] if per_sample \
            else [self.inputs]
        return compare([self.logits], run_outputs(candidate, batches), atol=atol, rtol=rtol,
                       names=["logits"], ref_name=f"recorded {self.recorded} (golden probe)",
                       cand_name=name)


def anchor_of(model: nn.Module) -> dict:
    """What a PASS for ``model`` is anchored to: the base check and the golden probe."""
    prov = provenance_of(model)
    if prov is None:
        return {"base": "not checked (model not built from a checkpoint)", "probe": "none"}
    bc = prov.get("base_check") or {}
    status = bc.get("status", "?")
    base = {"verified": f"verified: {bc.get('actual')} ({bc.get('tensors')} tensors, "
                        f"hashed in {bc.get('seconds', 0):.2f} s)",
            "complete": "the checkpoint holds every tensor (no separate base)",
            "mismatch-overridden": f"NOT VERIFIED (--allow-base-mismatch): expected "
                                   f"{bc.get('expected')}, got {bc.get('actual')}",
            "unrecorded-overridden": "NOT VERIFIED (--allow-base-mismatch): the checkpoint "
                                     "records no base hash"}.get(status, status)
    probe = prov.get("probe")
    return {"base": base, "base_status": status,
            "probe": "recorded" if probe is not None else
            ("none (official SSF checkpoint: its mapping is validated against dongzelian/SSF "
             "in the test suite)" if prov.get("source") == "official-ssf" else "none recorded")}


def golden_of(model: nn.Module) -> Optional[GoldenProbe]:
    """The golden probe recorded with ``model``'s task, or None when the task recorded none."""
    probe = (provenance_of(model) or {}).get("probe")
    return GoldenProbe(probe) if probe is not None else None


def check_golden(golden: Optional[GoldenProbe], candidate, name: str, *, chw: tuple, atol: float,
                 rtol: float, per_sample: bool) -> Optional[VerifyReport]:
    """``golden.check`` when the probe's inputs have the candidate's input shape ``chw``, else
    None (a probe recorded at another resolution, or a text probe, cannot be compared)."""
    if golden is None or sample_shape(golden.inputs) != list(chw):
        return None
    return golden.check(candidate, name, atol=atol, rtol=rtol, per_sample=per_sample)
