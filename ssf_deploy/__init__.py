"""ssf-deploy: SSF fine-tuning from paper to production.

The pipeline, in dependency order (each layer imports only the ones below it; the contract is
checked in CI by import-linter, see ``pyproject.toml``)::

    errors -> fileio -> layers, models, data -> tuners -> formats -> fuse -> verify, train
      -> export -> engine, quantize, refit -> deploy, bench -> tools (the CLI)
"""
from .deploy import DeployReport, deploy
from .errors import (BaseMismatchError, CheckpointError, FuseError, SSFDeployError, UsageError,
                     VerificationError)
from .formats import Task, build_model, read_task
from .fuse import FuseReport, fuse, fuse_with_report
from .models import count_params, create_base_model
from .quantize import QuantizeConfig, QuantizeReport, quantize_onnx
from .tuners import METHODS, apply_method, load_trainable_state, method_of, trainable_state_dict
from .verify import VerifyReport, compare, verify

__version__ = "0.2.0"

__all__ = ["SSFDeployError", "UsageError", "CheckpointError", "BaseMismatchError", "FuseError",
           "VerificationError", "METHODS", "apply_method", "count_params", "create_base_model",
           "method_of", "trainable_state_dict", "load_trainable_state", "fuse",
           "fuse_with_report", "FuseReport", "verify", "compare", "VerifyReport", "deploy",
           "DeployReport", "Task", "read_task", "build_model", "quantize_onnx", "QuantizeConfig",
           "QuantizeReport"]
