"""The one extension point for model families other than timm, and their registry.

timm is the default and needs none of it: every function of :mod:`ssf_deploy.models` (and the
image data config of :mod:`ssf_deploy.runtime.images`) runs its own timm code when
:func:`family_of` / :func:`family_for` say None. A family (e.g. transformers,
:mod:`ssf_deploy.hf`) owns arch names ``<prefix>:<id>`` and models whose class comes from its
package; it is imported only when such a name or model shows up, so ``import ssf_deploy`` never
imports transformers. The registry sits below the runtime layer so that every layer, down to the
image transforms, asks the same one.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .errors import UsageError, first_line

__all__ = ["ModelFamily", "register_family", "family_of", "family_for", "CREATE_RECORD"]

# where models.create_base_model records how a model was made (its arch names the family)
CREATE_RECORD = "ssf_deploy_create"


class ModelFamily:
    """How one family of models is created, fed and read by the pipeline.

    A model input ("batch") is a tensor (one image input) or a mapping of named tensors (text:
    ``input_ids``/``attention_mask``), sliced along dim 0; :func:`~ssf_deploy.models.call_model` passes a mapping as
    keyword arguments.
    """
    name: str = ""
    prefix: str = ""           # arch names "<prefix>:<id>"
    module_prefix: str = ""    # models whose class (or a base class) lives in this package

    def owns(self, model: nn.Module) -> bool:
        return any(c.__module__.split(".")[0] == self.module_prefix for c in type(model).__mro__)

    def resolve(self, arch: str) -> str:
        raise NotImplementedError

    def create(self, arch: str, num_classes: int, *, pretrained: bool = False,
               **kwargs) -> nn.Module:
        """A new model (random init drawn from torch's RNG, or ``pretrained`` weights)."""
        raise NotImplementedError

    def source(self, arch: str) -> str:
        """Where ``create(..., pretrained=True)`` took the weights from (recorded in tasks)."""
        raise NotImplementedError

    def rebuild(self, model: nn.Module, rec: Optional[dict], meta: bool) -> nn.Module:
        """A fresh, untuned instance of ``model``'s architecture (on the meta device if asked):
        what ``fuse`` loads the folded weights into."""
        raise NotImplementedError

    def sized_kwargs(self, arch: str, kwargs: dict, image_size: Optional[int]) -> tuple[dict, int]:
        raise NotImplementedError

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        raise NotImplementedError

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def example_input(self, model: nn.Module, batch: int, image_size: Optional[int], seed: int):
        raise NotImplementedError

    def probe_spec(self, model: nn.Module, image_size: int, in_chans: int, batch: int) -> dict:
        """What the golden probe feeds (see :mod:`ssf_deploy.formats.provenance`)."""
        return {"shape": [int(batch), int(in_chans), int(image_size), int(image_size)]}

    def onnx_names(self, model: nn.Module, example) -> tuple[list[str], list[str]]:
        """(input names, output names) of the exported graph."""
        raise NotImplementedError

    def data_config(self, model: Optional[nn.Module] = None, arch: Optional[str] = None) -> dict:
        """timm-style data config (input_size, mean, std, interpolation, crop_pct) for image
        transforms (training, calibration)."""
        raise NotImplementedError

    def site_place(self, name: str, module: nn.Module) -> Optional[tuple[Optional[str], str]]:
        """(block, role) of an SSF site by this family's module naming; None: timm's rules."""
        return None


_FAMILIES: dict[str, ModelFamily] = {}
# name -> (arch prefix, package of its model classes, module that registers it): imported lazily
_LAZY = {"transformers": ("transformers", "transformers", "ssf_deploy.hf.family")}


def register_family(family: ModelFamily) -> ModelFamily:
    _FAMILIES[family.name] = family
    return family


def _load(name: str) -> Optional[ModelFamily]:
    if name not in _FAMILIES and name in _LAZY:
        import importlib
        try:
            importlib.import_module(_LAZY[name][2])
        except ImportError as e:
            raise UsageError(f"{name} models need the optional extra: pip install "
                             f"\"ssf-deploy[hf]\" ({first_line(e)})") from None
    return _FAMILIES.get(name)


def family_for(arch: Optional[str]) -> Optional[ModelFamily]:
    """The family owning an arch name ``<prefix>:<id>``; None for timm names."""
    if not isinstance(arch, str) or ":" not in arch:
        return None
    prefix = arch.split(":", 1)[0]
    for name, (pre, _, _) in _LAZY.items():
        if pre == prefix:
            return _load(name)
    return next((f for f in _FAMILIES.values() if f.prefix == prefix), None)


def family_of(model: nn.Module) -> Optional[ModelFamily]:
    """The family of a model instance (its creation record, else its class); None for timm."""
    rec = model.__dict__.get(CREATE_RECORD) if isinstance(model, nn.Module) else None
    if rec is not None:
        return family_for(rec.get("arch"))
    for fam in _FAMILIES.values():
        if fam.owns(model):
            return fam
    mods = {c.__module__.split(".")[0] for c in type(model).__mro__}
    for name, (_, package, _) in _LAZY.items():
        if package in mods:
            return _load(name)
    return None
