"""The one key diff: which names of a state dict are missing, unexpected or of another shape."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

__all__ = ["KeyDiff", "key_diff"]


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


@dataclass
class KeyDiff:
    """``expected`` vs ``given``: keys only in ``expected``, only in ``given``, and common keys
    whose shapes differ (``(key, expected shape, given shape)``), each in ``expected``'s order."""
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    wrong_shape: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    @staticmethod
    def listing(keys: Iterable, limit: int = 3) -> str:
        """``a, b, c ...``: the first ``limit`` keys, and an ellipsis when there are more."""
        keys = list(keys)
        return ", ".join(str(k) for k in keys[:limit]) + (" ..." if len(keys) > limit else "")

    def summary(self) -> str:
        """``2 missing, 0 unexpected, 1 wrong-shaped key(s) (first missing: 'x')``."""
        first = next(((kind, k) for kind, ks in (("missing", self.missing),
                                                  ("unexpected", self.unexpected),
                                                  ("wrong-shaped", [w[0] for w in self.wrong_shape]))
                      for k in ks[:1]), None)
        text = (f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.wrong_shape)} wrong-shaped key(s)")
        return text + (f" (first {first[0]}: '{first[1]}')" if first else "")


def key_diff(expected: Mapping, given: Mapping, *, ignore: Iterable = (),
             shapes: bool = True) -> KeyDiff:
    """Compare two state dicts (or ``{key: shape}`` maps); keys in ``ignore`` are skipped."""
    skip = set(ignore)
    d = KeyDiff(missing=[k for k in expected if k not in given and k not in skip],
                unexpected=[k for k in given if k not in expected and k not in skip])
    if shapes:
        for k, v in expected.items():
            if k in given and k not in skip and _shape(v) != _shape(given[k]):
                d.wrong_shape.append((k, _shape(v), _shape(given[k])))
    return d
