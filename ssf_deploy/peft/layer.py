"""``SSFLayer``: a PEFT tuner layer that applies ``scale * base(x) + shift`` per channel.

One class wraps every kind of site (Linear, Conv, LayerNorm incl. channels-first, BatchNorm,
GroupNorm): where the channels are is :func:`ssf_deploy.tuners.ssf.site_of`'s answer, the same
one ``apply_method(model, "ssf")`` uses. The factors are ``ssf_scale[adapter]`` /
``ssf_shift[adapter]`` (PEFT's one-ParameterDict-per-weight layout, like IA3's ``ia3_l``); the
affine itself is :func:`ssf_deploy.layers.scale_shift.scale_shift`, so a trace under
``ssf_mode("graph")`` shows one node per site and the graph-level fold
(:func:`ssf_deploy.fuse.fold_ssf`) merges it exactly. Merging is therefore a model-level
operation (:class:`~ssf_deploy.peft.model.SSFModel`); a layer never merges on its own.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer

from ..layers.scale_shift import current_mode, layer_norm_scale_shift, scale_shift
from ..tuners.ssf import _init_, site_of

__all__ = ["SSFLayer"]


class SSFLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("ssf_scale", "ssf_shift")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        spec = site_of("", base_layer)
        if spec is None or spec[2]:
            raise ValueError(f"SSF cannot tune a {type(base_layer).__name__}: it follows Linear, "
                             f"Conv, LayerNorm, BatchNorm and GroupNorm layers")
        self.base_layer = base_layer
        self.ssf_scale = nn.ParameterDict({})
        self.ssf_shift = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.channels, self.dim = int(spec[0]), int(spec[1])
        self.out_features = self.channels
        self._only: Optional[list] = None   # set while SSFModel folds: exactly these adapters
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        ref = next((p for p in self.base_layer.parameters() if p.is_floating_point()), None)
        like = {"dtype": ref.dtype if ref is not None else torch.float32,
                "device": ref.device if ref is not None else None}
        if config.scale:
            scale = nn.Parameter(torch.empty(1 if config.scalar_scale else self.channels, **like))
            _init_(scale, config.init_method, 1.0, config.init_std)
            self.ssf_scale[adapter_name] = scale
        if config.shift:
            shift = nn.Parameter(torch.empty(self.channels, **like))
            _init_(shift, config.init_method, 0.0, config.init_std)
            self.ssf_shift[adapter_name] = shift
        self.set_adapter(self.active_adapters)
        if getattr(config, "inference_mode", False):
            for p in (self.ssf_scale.get(adapter_name), self.ssf_shift.get(adapter_name)):
                if p is not None:
                    p.requires_grad_(False)

    def _applied(self) -> list[str]:
        """The adapters this forward applies, in order."""
        if self._only is not None:
            names = list(self._only)
        elif self.disable_adapters or self.merged:
            return []
        else:
            names = self.active_adapters
        return [n for n in names if n in self.ssf_scale or n in self.ssf_shift]

    def _factors(self, name: str):
        return (self.ssf_scale[name] if name in self.ssf_scale else None,
                self.ssf_shift[name] if name in self.ssf_shift else None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self._applied()
        base = self.base_layer
        if len(names) == 1 and type(base) is nn.LayerNorm and not args and not kwargs \
                and torch.is_grad_enabled() and current_mode() == "lean":
            # training: SSF folded into the norm (layer_norm(x, scale*w, scale*b + shift)) keeps
            # nothing a frozen norm does not keep, instead of the norm's output
            return layer_norm_scale_shift(x, base.normalized_shape, base.weight, base.bias,
                                          base.eps, *self._factors(names[0]))
        out = base(x, *args, **kwargs)
        for name in names:
            out = scale_shift(out, *self._factors(name), self.dim)
        return out

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """A no-op once :class:`SSFModel` has merged these adapters (its unload calls it)."""
        names = adapter_names or self.active_adapters
        pending = [n for n in names if (n in self.ssf_scale or n in self.ssf_shift)
                   and n not in self.merged_adapters]
        if pending:
            raise ValueError("SSF merges graph-level, across layers: call merge_adapter() or "
                             "merge_and_unload() on the model, not merge() on one layer")

    def unmerge(self) -> None:
        if self.merged:
            raise ValueError("SSF unmerges graph-level: call unmerge_adapter() on the model")

    def __repr__(self) -> str:
        return "ssf." + super().__repr__()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.dim}"
