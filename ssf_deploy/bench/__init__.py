"""Cost of every tuning method, measured one way on one machine (paper Fig. 3 and Table 2).

Each row is one *method* built on the same base model. Training rows time a whole optimiser
step, record its peak memory and the bytes autograd saves for backward; inference rows time the
deployable model (``ssf-fused``: the base architecture holding the folded SSF weights).

The package, one job per module: :mod:`.rows` (what is compared, built the same way in every
process), :mod:`.measure` (one pass of one row: time *or* memory, FLOPs, params),
:mod:`.backends` (onnxruntime / TensorRT inference on the bench device), :mod:`.isolate` (each
pass in a fresh subprocess), :mod:`.run` (the order of passes, ``--repeat``, medians),
:mod:`.noise` (load and spread warnings), :mod:`.progress`, :mod:`.table2` (the paper's
formulas vs measurement), :mod:`.report` (the table) and :mod:`.plot` (Figure 3).
"""
from .measure import count_flops, measure_task, saved_for_backward
from .noise import spread
from .plot import plot
from .report import format_table
from .rows import (ALWAYS, BACKENDS, ROWS, SAME_AS_BASE, TRAIN_ROWS, BenchConfig, build_row,
                   check_backend, check_device, create_model, inputs, resolve_methods)
from .run import SCHEMA_KEYS, plan, run_bench
from .table2 import table2, table2_formulas, vit_geometry

__all__ = ["ROWS", "TRAIN_ROWS", "SAME_AS_BASE", "ALWAYS", "BACKENDS", "BenchConfig",
           "resolve_methods", "check_device", "check_backend", "create_model", "build_row",
           "inputs", "measure_task", "run_bench", "plan", "count_flops", "saved_for_backward",
           "spread", "table2", "table2_formulas", "vit_geometry", "format_table", "plot",
           "SCHEMA_KEYS"]
