"""Full fine-tuning: every parameter trains (the paper's upper reference)."""
from dataclasses import dataclass

from .base import Tuner, register


@register
class Full(Tuner):
    name = "full"
    freezes_backbone = False

    @dataclass
    class Config:
        pass

    @classmethod
    def inject(cls, model, cfg):
        for p in model.parameters():
            p.requires_grad_(True)
