"""Visual Prompt Tuning (Jia et al. 2022): learnable tokens inserted after the embedding.

Shallow: ``n`` prompts enter before the first block and flow through the network.
Deep: every block gets its own ``n`` prompts, replacing the previous block's prompt outputs.
Prompts sit right after the prefix (class/register) tokens and are dropped after the last block,
so the head sees the same tokens as the base model. Needs a plain token sequence (ViT/DeiT-style
``patch_embed`` + ``blocks`` + ``num_prefix_tokens``); windowed models like Swin are refused.
"""
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UsageError
from .base import Tuner, add_hook, add_params, owner_of, register, set_owner


def _check_model(model: nn.Module, method: str) -> tuple[nn.Module, int, int]:
    blocks = getattr(model, "blocks", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    embed = getattr(model, "patch_embed", None)
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or prefix is None or embed is None \
            or dim is None or len(blocks) == 0:
        raise UsageError(
            f"{method} needs a ViT-style token sequence (patch_embed, blocks, num_prefix_tokens); "
            f"{type(model).__name__} has none — use ssf, adapter, bias, linear or full")
    return blocks, int(prefix), int(dim)


def _prompt_init(model: nn.Module, n: int, dim: int, depth: int) -> nn.Parameter:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    val = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + dim))  # VPT's xavier-uniform bound
    return nn.Parameter(torch.empty(depth, n, dim).uniform_(-val, val))


_STATE = "_ssf_deploy_vpt"   # per block: (prompt layer or None, prefix tokens, prompts)


class _VPTBase(Tuner):
    deep = False
    fusable = False          # the prompts stay in the deployed sequence
    adds_tokens = True
    key_pattern = r"^vpt_prompts$"

    @dataclass
    class Config:
        prompts: int = field(default=50, metadata={
            "cli": "--prompts", "help": "VPT prompt tokens (default: 200 shallow, 50 deep, as in "
                                        "Table 5)."})
        dropout: float = field(default=0.0, metadata={
            "cli": "--prompt-dropout", "help": "Dropout on the prompt tokens (VPT; 0)."})

        def validate(self):
            if int(self.prompts) < 1:
                raise UsageError(f"prompts must be >= 1, got {self.prompts}")
            if not 0.0 <= float(self.dropout) < 1.0:
                raise UsageError(f"prompt dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def matches(cls, state: dict) -> bool:
        prompts = state.get("vpt_prompts")
        return prompts is not None and (prompts.shape[0] > 1) == cls.deep

    @classmethod
    def inject(cls, model, cfg):
        blocks, prefix, dim = _check_model(model, cls.name)
        n = int(cfg.prompts)
        depth = len(blocks) if cls.deep else 1
        add_params(model, "vpt_prompts", _prompt_init(model, n, dim, depth))
        # registered, so model.eval() turns prompt dropout off and a deepcopy gets its own
        add_params(model, "vpt_dropout", nn.Dropout(float(cfg.dropout)))
        for i, block in enumerate(blocks):
            set_owner(block, model)
            block.__dict__[_STATE] = (i if (cls.deep or i == 0) else None, prefix, n)
            if i == 0:
                add_hook(block, _insert, pre=True)
            elif cls.deep:
                add_hook(block, _replace, pre=True)
        add_hook(blocks[-1], _strip)


def _tokens(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Block ``block``'s prompts, read from the model that owns them (a copy reads its own)."""
    model = owner_of(block)
    layer = block.__dict__[_STATE][0]
    p = model.vpt_dropout(model.vpt_prompts[layer])
    return p.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)


def _insert(block, args):
    x, (_, prefix, _) = args[0], block.__dict__[_STATE]
    return (torch.cat([x[:, :prefix], _tokens(block, x), x[:, prefix:]], 1), *args[1:])


def _replace(block, args):
    x, (_, prefix, n) = args[0], block.__dict__[_STATE]
    return (torch.cat([x[:, :prefix], _tokens(block, x), x[:, prefix + n:]], 1), *args[1:])


def _strip(block, args, out):
    _, prefix, n = block.__dict__[_STATE]
    return torch.cat([out[:, :prefix], out[:, prefix + n:]], 1)


@register
class VPTShallow(_VPTBase):
    name = "vpt-shallow"
    deep = False

    @dataclass
    class Config(_VPTBase.Config):
        prompts: int = field(default=200, metadata=_VPTBase.Config.__dataclass_fields__[
            "prompts"].metadata)   # Table 5 uses 200 shallow prompts on CIFAR-100


@register
class VPTDeep(_VPTBase):
    name = "vpt-deep"
    deep = True

    @dataclass
    class Config(_VPTBase.Config):
        prompts: int = field(default=50, metadata=_VPTBase.Config.__dataclass_fields__[
            "prompts"].metadata)   # Table 5 uses 50 deep prompts on CIFAR-100
