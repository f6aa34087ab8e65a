"""ssf-deploy: SSF fine-tuning from paper to production.

The pipeline, in dependency order (each layer imports only the ones below it; the contract is
checked in CI by import-linter, see ``pyproject.toml``)::

    errors -> fileio -> runtime (I/O) -> layers, models, data -> tuners -> formats -> fuse
      -> verify, train -> export, anchor -> engine, quantize -> refit -> deploy, bench -> job
      -> tools (the CLI)

Everything is imported eagerly (``ssf_deploy.fuse`` is the function, never the submodule), which
takes seconds; when this import is ``python -m ssf_deploy ...`` starting the CLI, a Ctrl-C in
that time is one line and exit 130 (:mod:`ssf_deploy_launcher`), not a traceback from torch.
"""
try:
    import ssf_deploy_launcher as _launcher
except ImportError:   # the package copied without its launcher: plain Python behaviour
    _launcher = None
if _launcher is not None and _launcher.cli_module_being_run():
    _launcher.guard()   # released by the launcher's main() once the CLI is imported

from .bundle import BundleReport, BundleRunner, add_tasks, bundle, remove_tasks, task_table, verify_bundle  # noqa: E402
from .deploy import DeployReport, deploy  # noqa: E402
from .errors import (BaseMismatchError, CheckpointError, FuseError, SSFDeployError, UsageError,
                     VerificationError)
from .formats import Task, build_model, read_task
from .formats.checkpoint import save_task
from .fuse import FuseReport, fuse, fuse_with_report
from .gate import DeploymentCheck, check_deployment
from .models import count_params, create_base_model
from .quantize import QuantizeConfig, QuantizeReport, quantize_onnx
from .tuners import METHODS, apply_method, load_trainable_state, method_of, trainable_state_dict
from .verify import VerifyReport, compare, verify

__version__ = "0.2.0"

__all__ = ["SSFDeployError", "UsageError", "CheckpointError", "BaseMismatchError", "FuseError",
           "VerificationError", "METHODS", "apply_method", "count_params", "create_base_model",
           "method_of", "trainable_state_dict", "load_trainable_state", "fuse",
           "fuse_with_report", "FuseReport", "verify", "compare", "VerifyReport", "deploy",
           "DeployReport", "Task", "read_task", "build_model", "save_task", "quantize_onnx",
           "QuantizeConfig", "QuantizeReport", "bundle", "add_tasks", "remove_tasks",
           "verify_bundle", "task_table", "BundleReport", "BundleRunner",
           "check_deployment", "DeploymentCheck"]
