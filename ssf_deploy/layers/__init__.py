"""Shared building blocks: the SSF-ADA operation in its three forms (graph, naive, lean)."""
from .scale_shift import (MODES, RECOVER_MIN_ABS_SCALE, LeanPolicy, ResidualSlot, current_mode,
                          layer_norm_recompute, layer_norm_scale_shift, linear_scale_shift,
                          scale_shift, scales_recoverable, ssf_mode)

__all__ = ["MODES", "RECOVER_MIN_ABS_SCALE", "LeanPolicy", "ResidualSlot", "current_mode",
           "layer_norm_recompute", "layer_norm_scale_shift", "linear_scale_shift", "scale_shift",
           "scales_recoverable", "ssf_mode"]
