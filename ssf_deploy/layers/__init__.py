"""Building blocks shared by the tuning methods."""
from .scale_shift import MODES, current_mode, layer_norm_recompute, scale_shift, ssf_mode

__all__ = ["MODES", "current_mode", "layer_norm_recompute", "scale_shift", "ssf_mode"]
