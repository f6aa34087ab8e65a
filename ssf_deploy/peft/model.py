"""``SSFModel``: the PEFT tuner that injects :class:`~ssf_deploy.peft.layer.SSFLayer`s and merges
them with ssf-deploy's graph-level fold.

Merging SSF is not a per-layer affair: a shift after a Linear without a bias, or after a norm
without an affine, has to be absorbed by the *next* op's weights. So ``merge_and_unload`` (and
``merge_adapter``) trace the model with :func:`ssf_deploy.fuse.fold_ssf` — the same exact fold
``ssf-deploy fuse`` applies, in float64 — write the folded values into the base layers' own
tensors, check the merged model against the unmerged one on example inputs (``atol`` 1e-4), and
only then unwrap: the result is the base class with the base's own state-dict keys. A fold that
would need a parameter the base does not have is refused before anything changes.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists

from ..errors import FuseError
from ..fuse import fold_ssf
from ..models import example_input, family_of, head_modules
from ..tuners.ssf import site_of
from ..verify import compare, run_outputs
from .layer import SSFLayer

__all__ = ["SSFModel", "MERGE_ATOL"]

MERGE_ATOL = 1e-4   # merged vs unmerged outputs on the example inputs, absolute


def _is_factor(key: str) -> bool:
    return ".ssf_scale." in key or ".ssf_shift." in key


class SSFModel(BaseTuner):
    """SSF (Lian et al., NeurIPS 2022) as a PEFT method; see :class:`~ssf_deploy.peft.SSFConfig`.

    Example::

        import ssf_deploy.peft                      # registers "SSF" with PEFT
        from peft import get_peft_model
        model = get_peft_model(base, ssf_deploy.peft.SSFConfig(modules_to_save=["classifier"]))
        ...                                         # train (transformers.Trainer works)
        merged = model.merge_and_unload()           # base class, base keys, exact
    """

    prefix: str = "ssf_"
    tuner_layer_cls = SSFLayer
    target_module_mapping: dict = {}

    # ------------------------------------------------------------------ injection

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config   # target_modules=None means the paper's placement, not a lookup table

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        self._ssf_defaults = self.default_targets(model, bias_free=peft_config.bias_free)

    @staticmethod
    def default_targets(model: nn.Module, bias_free: bool = False) -> set[str]:
        """The paper's placement: every Linear/Conv with a bias (all with ``bias_free``) and every
        norm, except the output layer(s) and what other adapters already own."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
        skip = {id(m) for h in head_modules(model) for m in h.modules()}
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(out, nn.Module):
            skip |= {id(m) for m in out.modules()}
        for m in model.modules():
            if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)):
                skip |= {id(c) for c in m.modules() if not isinstance(c, SSFLayer)}
        names = set()
        for name, m in model.named_modules():
            if not name or id(m) in skip:
                continue
            if isinstance(m, SSFLayer):   # another SSF adapter on the same layer: a target too
                m = m.base_layer
            spec = site_of(name, m)
            if spec is None or spec[2]:
                continue
            if not bias_free and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) \
                    and m.bias is None:
                continue
            names.add(name)
        return names

    def _check_target_module_exists(self, peft_config, key: str):
        if peft_config.target_modules is None:
            if key not in getattr(self, "_ssf_defaults", set()):
                return False
            probe = copy.copy(peft_config)   # exclusions, modules_to_save, layers_to_transform
            probe.target_modules = {key}
            return check_target_module_exists(probe, key)
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent,
                            current_key, **kwargs) -> None:
        if isinstance(target, SSFLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new = SSFLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # the factors are created on the base layer's device and dtype: nothing to move (PEFT's
        # own version would also look for a weight on weight-less norms)
        setattr(parent, child_name, new_module)

    # ------------------------------------------------------------------ merging

    def _layers(self) -> list[SSFLayer]:
        return [m for m in self.model.modules() if isinstance(m, SSFLayer)]

    def _fold_into_base(self, adapter_names: Optional[list[str]], safe_merge: bool,
                        example_inputs, stash: bool) -> None:
        """Fold the adapters into the base tensors in place, checked; undone on any failure."""
        layers = self._layers()
        names = list(adapter_names or self.active_adapters)
        names = [n for n in names if any((n in m.ssf_scale or n in m.ssf_shift)
                                         and n not in m.merged_adapters for m in layers)]
        if not names:
            return
        if example_inputs is None:
            if family_of(self.model) is None and not hasattr(self.model, "pretrained_cfg"):
                raise ValueError(f"SSF merges by tracing the model: pass example_inputs= (a "
                                 f"batch {type(self.model).__name__} takes) to merge")
            example_inputs = example_input(self.model, batch=2)
        tensors = self.model.state_dict(keep_vars=True)
        originals: dict[str, torch.Tensor] = {}
        flagged: list[tuple[SSFLayer, str]] = []

        def only(which):
            for m in layers:
                m._only = which
        try:
            only(names)
            try:
                reference = run_outputs(self.model, [example_inputs])
            finally:
                only(None)
            for name in names:   # one at a time, in the order the forward applies them
                only([name])
                try:
                    folded, report = fold_ssf(self.model, example_inputs)
                except FuseError as e:   # PEFT's callers expect a ValueError
                    raise ValueError(f"cannot merge SSF adapter '{name}': {e}") from None
                finally:
                    only(None)
                if report.added:
                    raise ValueError(
                        f"cannot merge SSF adapter '{name}' into the base layers exactly: "
                        f"{report.added[0][1]} (the base would need {len(report.added)} new "
                        f"parameter(s)); leave such layers out of target_modules")
                writes = {k: v for k, v in folded.items() if not _is_factor(k) and k in tensors}
                if safe_merge:
                    bad = [k for k, v in writes.items() if not torch.isfinite(v).all()]
                    if bad:
                        raise ValueError(f"NaNs detected in the merged weights ({bad[0]}): the "
                                         f"adapter {name} seems to be broken")
                with torch.no_grad():
                    for k, v in writes.items():
                        t = tensors[k]
                        if k not in originals:
                            originals[k] = t.detach().clone()
                        t.copy_(v.to(device=t.device, dtype=t.dtype))
                for m in layers:
                    if name not in m.merged_adapters:
                        m.merged_adapters.append(name)
                        flagged.append((m, name))
            got = run_outputs(self.model, [example_inputs])
            check = compare(reference, got, atol=MERGE_ATOL, rtol=0.0, ref_name="unmerged",
                            cand_name="merged")
            if not check.passed:
                raise ValueError(f"the merged model does not reproduce the unmerged one: {check}")
        except BaseException:
            with torch.no_grad():
                for k, v in originals.items():
                    tensors[k].copy_(v)
            for m, name in flagged:
                m.merged_adapters.remove(name)
            raise
        if stash:
            store = self.__dict__.setdefault("_ssf_stash", {})
            for k, v in originals.items():
                store.setdefault(k, v)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False,
                      example_inputs=None) -> None:
        """Fold the adapters into the base weights, keeping the layers (and a copy of the
        original weights: ``unmerge_adapter`` restores them exactly)."""
        self._check_merge_allowed()
        self._fold_into_base(adapter_names, safe_merge, example_inputs, stash=True)

    def unmerge_adapter(self) -> None:
        store = self.__dict__.pop("_ssf_stash", {})
        tensors = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in store.items():
                tensors[k].copy_(v)
        for m in self._layers():
            m.merged_adapters = []

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled and any(m.merged for m in self._layers()):
            self.unmerge_adapter()
        super()._enable_adapter_layers(enabled)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None,
                                     example_inputs=None):
        if merge:
            self._check_merge_allowed()
            self._fold_into_base(adapter_names, safe_merge, example_inputs, stash=False)
        elif "_ssf_stash" in self.__dict__:
            self.unmerge_adapter()   # unload() returns the base as it was
        self.__dict__.pop("_ssf_stash", None)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar,
                                                    safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None,
                         example_inputs=None) -> nn.Module:
        """The base model with the adapters folded into its weights: its own class and
        state-dict keys, outputs within ``MERGE_ATOL`` of the unmerged model (checked on
        ``example_inputs``; default: random inputs of the model's size)."""
        return self._unload_and_optionally_merge(progressbar=progressbar, safe_merge=safe_merge,
                                                 adapter_names=adapter_names,
                                                 example_inputs=example_inputs)
