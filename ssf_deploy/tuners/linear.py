"""Linear probing: only the classifier head trains."""
from dataclasses import dataclass

from .base import Tuner, register


@register
class Linear(Tuner):
    name = "linear"

    @dataclass
    class Config:
        pass

    @classmethod
    def inject(cls, model, cfg):
        pass  # the head is unfrozen by apply_method for every method
