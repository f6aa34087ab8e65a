"""The package's shape: the import contract holds, and public functions stay functions."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contract_holds():
    """pyproject.toml's import-linter contracts: the layers, and no library module imports the CLI."""
    pytest.importorskip("importlinter")
    r = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command;"
                        "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("name", ["fuse", "verify", "deploy", "read_task", "build_model",
                                  "apply_method", "fuse_with_report", "compare"])
def test_public_functions_stay_callable_after_their_module_is_imported(name):
    """``ssf_deploy.fuse`` must not turn into the ``ssf_deploy.fuse`` module after first use."""
    import ssf_deploy
    fn = getattr(ssf_deploy, name)
    for mod in ("fuse", "verify", "deploy", "formats", "tuners", "export"):
        importlib.import_module(f"ssf_deploy.{mod}")
    assert getattr(ssf_deploy, name) is fn and callable(fn)


def test_public_api_runs_twice_in_one_session():
    """The README's example, twice in one interpreter (a notebook re-running a cell)."""
    import torch
    import ssf_deploy
    from conftest import make_model
    for _ in range(2):
        model = make_model("vit")
        ssf_deploy.apply_method(model, "ssf")
        fused = ssf_deploy.fuse(model)
        report = ssf_deploy.verify(model, fused, torch.randn(2, 3, 32, 32))
        assert report.passed, str(report)
