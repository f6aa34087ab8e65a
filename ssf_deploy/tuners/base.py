"""The one injection mechanism every tuning method uses.

A method never forks model code: it adds its parameters to existing modules (so base parameter
names stay untouched) and attaches forward hooks that ``torch.export`` traces like any other code.
``unload`` removes both again, which is what makes "fused = base architecture" checkable.
"""
from __future__ import annotations

import dataclasses
import re
import types
from typing import Any, Callable, ClassVar, Optional

from torch import nn

from ..errors import SSFDeployError, UsageError
from ..models import head_modules

__all__ = ["Tuner", "register", "get_tuner", "tuners", "METHODS", "add_hook", "add_params",
           "add_forward", "base_forward", "unload", "freeze_backbone", "transformer_blocks", "infer_method", "owner_of",
           "set_owner"]

_REGISTRY: dict[str, type["Tuner"]] = {}
METHODS: list[str] = []

_ADDED = "_ssf_deploy_added"   # per-module list of attribute names a method registered
_MARK = "__ssf_deploy_hook__"  # set on every hook function a method attaches
_OWNER = "_ssf_deploy_owner"   # module whose parameters a hook on another module reads

def register(cls: type["Tuner"]) -> type["Tuner"]:
    _REGISTRY[cls.name] = cls
    METHODS.append(cls.name)
    return cls


def get_tuner(method: str) -> type["Tuner"]:
    if method not in _REGISTRY:
        raise UsageError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    return _REGISTRY[method]


def tuners() -> list[type["Tuner"]]:
    """Every registered method, in registration order."""
    return [_REGISTRY[m] for m in METHODS]


class Tuner:
    """A tuning method: a config dataclass plus ``inject``; trainability is derived from it.

    Capabilities live on the class, so tools never keep their own lists of methods:
    ``fusable`` (deploys as the unchanged base graph), ``adds_tokens`` (changes the sequence),
    ``key_pattern`` (regex matching the state keys only this method creates; lets a plain state
    dict say which method made it). CLI options come from the Config fields' ``metadata``
    (``cli``, ``help``, ``flag``, ``csv``, ``choices``).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    freezes_backbone: ClassVar[bool] = True
    fusable: ClassVar[bool] = True
    adds_tokens: ClassVar[bool] = False
    key_pattern: ClassVar[Optional[str]] = None

    @classmethod
    def matches(cls, state: dict) -> bool:
        """Does a state dict carry this method's own parameters?"""
        if cls.key_pattern is None:
            return False
        pattern = re.compile(cls.key_pattern)
        return any(pattern.search(k) for k in state)

    @classmethod
    def make_config(cls, **options: Any):
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise UsageError(f"method '{cls.name}' has no option(s) {', '.join(unknown)}; "
                                 f"valid: {', '.join(sorted(fields)) or 'none'}")
        try:
            cfg = cls.Config(**options)
        except (TypeError, ValueError) as e:
            raise UsageError(f"bad option for method '{cls.name}': {e}") from e
        validate = getattr(cfg, "validate", None)
        if validate:
            validate()
        return cfg

    @classmethod
    def inject(cls, model: nn.Module, cfg) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def infer_method(state: dict) -> str:
    """The method whose own keys a state dict carries (``full`` when none does)."""
    for tuner in tuners():
        if tuner.matches(state):
            return tuner.name
    return "full"


def add_params(module: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    """Register a new parameter/submodule on ``module``; the name is remembered for ``unload``.

    The record lives on the module itself, so a ``deepcopy`` of a tuned model unloads correctly.
    """
    if hasattr(module, name):
        raise SSFDeployError(f"module {type(module).__name__} already has an attribute '{name}'")
    if isinstance(value, nn.Parameter):
        module.register_parameter(name, value)
    else:
        module.add_module(name, value)
    module.__dict__.setdefault(_ADDED, []).append(name)


def set_owner(module: nn.Module, owner: nn.Module) -> None:
    """Let hooks on ``module`` reach ``owner``'s parameters; ``deepcopy`` remaps the reference."""
    module.__dict__[_OWNER] = owner


def owner_of(module: nn.Module) -> nn.Module:
    return module.__dict__[_OWNER]


def add_hook(module: nn.Module, fn: Callable, *, pre: bool = False,
             with_kwargs: bool = False) -> None:
    """Attach a marked hook. Hooks should reach their parameters through the module argument
    (or attributes of it), not closures, so that copies of the model stay self-contained."""
    setattr(fn, _MARK, True)
    if pre:
        module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
    else:
        module.register_forward_hook(fn, with_kwargs=with_kwargs)


def add_forward(module: nn.Module, fn: Callable) -> None:
    """Run ``fn(module, *args, **kwargs)`` as ``module``'s forward (marked, removed by ``unload``).

    For a method that must compute *instead of* the module rather than after it (SSF folded into
    its producer while training). ``fn`` reads everything through ``module`` like a hook, falls
    back to :func:`base_forward` for whatever it does not handle, and must be a module-level
    function: a ``deepcopy`` rebinds it to the copy. Forward hooks still run around it.
    """
    if "forward" in module.__dict__:
        raise SSFDeployError(f"module {type(module).__name__} already has its forward replaced")
    setattr(fn, _MARK, True)
    module.forward = types.MethodType(fn, module)


def base_forward(module: nn.Module, *args, **kwargs):
    """The module class's own forward (what :func:`add_forward` replaced)."""
    return type(module).forward(module, *args, **kwargs)


def unload(model: nn.Module) -> nn.Module:
    """Remove every hook and added parameter (PEFT's ``unload``); merge first to keep the task."""
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if fwd is not None and getattr(getattr(fwd, "__func__", None), _MARK, False):
            del module.__dict__["forward"]
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, fn in hooks.items() if getattr(fn, _MARK, False)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        for name in module.__dict__.pop(_ADDED, []):
            module._parameters.pop(name, None)
            module._modules.pop(name, None)
            module.__dict__.pop(name, None)
        for key in [k for k in module.__dict__ if k.startswith("_ssf_deploy_")]:
            del module.__dict__[key]   # owner links and per-module method state
    model.__dict__.pop("ssf_deploy_method", None)
    return model


def freeze_backbone(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_head(model: nn.Module) -> None:
    for head in head_modules(model):
        for p in head.parameters():
            p.requires_grad_(True)


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules shaped like a transformer block: they own both ``attn`` and ``mlp``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "attn", None), nn.Module)
            and isinstance(getattr(m, "mlp", None), nn.Module)]

