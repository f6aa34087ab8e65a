"""One graph, many tasks: swap a task's fused weights into an ONNX session or a TensorRT engine
by ONNX initializer name, instead of re-exporting or rebuilding.

* :mod:`.weights` — a task's value for every initializer of a graph (pure Python, CPU);
* :mod:`.pipeline` — :func:`refit_onnx` and :func:`refit_plan`, checked against the task's own
  references and its golden probe, what ``ssf-deploy refit`` runs.
"""
from ..runtime import load_onnx
from .pipeline import RefitReport, refit_onnx, refit_plan, task_inputs
from .weights import (META_EXPORT, TaskOrtRunner, TaskWeights, bake_initializers,
                      check_task_matches, compute_task_weights, export_settings,
                      graph_weight_names, same_graph)

__all__ = ["load_onnx", "RefitReport", "refit_onnx", "refit_plan", "task_inputs",
           "META_EXPORT", "TaskOrtRunner", "TaskWeights", "bake_initializers",
           "check_task_matches", "compute_task_weights", "export_settings",
           "graph_weight_names", "same_graph"]
