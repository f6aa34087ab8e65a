"""Shared building blocks: the SSF-ADA operation in its three forms (graph, naive, lean)."""
from .scale_shift import MODES, LeanPolicy, layer_norm_recompute, scale_shift, ssf_mode

__all__ = ["MODES", "LeanPolicy", "layer_norm_recompute", "scale_shift", "ssf_mode"]
