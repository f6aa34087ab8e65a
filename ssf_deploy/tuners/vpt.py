"""Visual Prompt Tuning (Jia et al. 2022): learnable tokens inserted after the embedding.

Shallow: ``n`` prompts enter before the first block and flow through the network.
Deep: every block gets its own ``n`` prompts, replacing the previous block's prompt outputs.
Prompts sit right after the prefix (class/register) tokens and are dropped after the last block,
so the head sees the same tokens as the base model. Needs a plain token sequence (ViT/DeiT-style
``patch_embed`` + ``blocks`` + ``num_prefix_tokens``); windowed models like Swin are refused.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SSFDeployError
from .base import Tuner, add_hook, add_params, register


def _check_model(model: nn.Module, method: str) -> tuple[nn.Module, int, int]:
    blocks = getattr(model, "blocks", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    embed = getattr(model, "patch_embed", None)
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or prefix is None or embed is None \
            or dim is None or len(blocks) == 0:
        raise SSFDeployError(
            f"{method} needs a ViT-style token sequence (patch_embed, blocks, num_prefix_tokens); "
            f"{type(model).__name__} has none — use ssf, adapter, bias, linear or full")
    return blocks, int(prefix), int(dim)


def _prompt_init(model: nn.Module, n: int, dim: int, depth: int) -> nn.Parameter:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    val = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + dim))  # VPT's xavier-uniform bound
    return nn.Parameter(torch.empty(depth, n, dim).uniform_(-val, val))


class _VPTBase(Tuner):
    deep = False

    @dataclass
    class Config:
        prompts: int = 50
        dropout: float = 0.0

        def validate(self):
            if int(self.prompts) < 1:
                raise SSFDeployError(f"prompts must be >= 1, got {self.prompts}")

    @classmethod
    def inject(cls, model, cfg):
        blocks, prefix, dim = _check_model(model, cls.name)
        n = int(cfg.prompts)
        depth = len(blocks) if cls.deep else 1
        prompts = _prompt_init(model, n, dim, depth)
        add_params(model, model, "vpt_prompts", prompts)
        drop = nn.Dropout(cfg.dropout)

        def tokens(i: int, batch: int, like: torch.Tensor) -> torch.Tensor:
            return drop(prompts[i]).to(like.dtype).unsqueeze(0).expand(batch, -1, -1)

        def insert(module, args):
            x = args[0]
            return (torch.cat([x[:, :prefix], tokens(0, x.shape[0], x), x[:, prefix:]], 1),
                    *args[1:])
        add_hook(model, blocks[0], insert, pre=True)

        if cls.deep:
            for i in range(1, len(blocks)):
                def replace(module, args, i=i):
                    x = args[0]
                    return (torch.cat([x[:, :prefix], tokens(i, x.shape[0], x),
                                       x[:, prefix + n:]], 1), *args[1:])
                add_hook(model, blocks[i], replace, pre=True)

        def strip(module, args, out):
            return torch.cat([out[:, :prefix], out[:, prefix + n:]], 1)
        add_hook(model, blocks[-1], strip)


@register
class VPTShallow(_VPTBase):
    name = "vpt-shallow"
    deep = False

    @dataclass
    class Config(_VPTBase.Config):
        prompts: int = 200   # Table 5 uses 200 shallow prompts on CIFAR-100


@register
class VPTDeep(_VPTBase):
    name = "vpt-deep"
    deep = True

    @dataclass
    class Config(_VPTBase.Config):
        prompts: int = 50    # Table 5 uses 50 deep prompts on CIFAR-100
