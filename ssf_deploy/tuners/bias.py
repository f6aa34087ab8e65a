"""Bias tuning (BitFit): every bias term trains, LayerNorm/BatchNorm biases included."""
from dataclasses import dataclass

from .base import Tuner, register


@register
class Bias(Tuner):
    name = "bias"

    @dataclass
    class Config:
        pass

    @classmethod
    def inject(cls, model, cfg):
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
