"""Adapter: a residual bottleneck (down-proj, non-linearity, up-proj) after each block's MLP.

The placement and default width follow the Adapter baseline the paper reuses from VPT
(Pfeiffer-style, one adapter per block, reduction 64: d' = 12 for ViT-B), which reproduces
Table 5's 0.31M trainable parameters. The up-projection starts at zero so the adapted model
starts as the pre-trained one.
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SSFDeployError, UsageError
from .base import Tuner, add_hook, add_params, register, transformer_blocks


class Bottleneck(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


@register
class Adapter(Tuner):
    name = "adapter"
    fusable = False          # the bottleneck stays in the deployed graph
    key_pattern = r"\.adapter\."

    @dataclass
    class Config:
        dim: int = field(default=12, metadata={"cli": "--adapter-dim",
                                               "help": "Adapter bottleneck width d' (12)."})
        act: str = field(default="gelu", metadata={"cli": "--adapter-act",
                                                   "choices": ("gelu", "relu"),
                                                   "help": "Adapter non-linearity (gelu)."})

        def validate(self):
            if int(self.dim) < 1:
                raise UsageError(f"adapter dim must be >= 1, got {self.dim}")
            if self.act not in ("gelu", "relu"):
                raise UsageError(f"adapter act must be gelu or relu, got {self.act!r}")

    @classmethod
    def inject(cls, model, cfg):
        blocks = transformer_blocks(model)
        if not blocks:
            raise UsageError(
                f"adapter needs transformer blocks (modules with .attn and .mlp); "
                f"{type(model).__name__} has none — use ssf, bias, linear or full")
        for _, block in blocks:
            mlp = block.mlp
            out_dim = _mlp_out_features(mlp)
            adapter = Bottleneck(out_dim, int(cfg.dim), cfg.act)
            add_params(mlp, "adapter", adapter)
            add_hook(mlp, _residual)


def _residual(mlp, args, out):
    return out + mlp.adapter(out)


def _mlp_out_features(mlp: nn.Module) -> int:
    last = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise SSFDeployError(f"cannot find the output width of {type(mlp).__name__}")
    return last[-1].out_features
