"""The one place ssf-deploy reaches into PEFT's internals: registering SSF as a method.

PEFT's public ``peft.utils.register_peft_method`` only accepts a name that is already a member
of its ``PeftType`` enum ("Unknown PEFT type SSF" otherwise), and PEFT has no SSF member. So the
member is added to the enum first, through the enum's own tables (``_member_map_``,
``_member_names_``, ``_value2member_map_``; ``_add_member_`` where Python has it) — not public
API of either PEFT or Python. Everything after that is PEFT's public registration, so
``get_peft_model``, ``PeftConfig``/``PeftModel.from_pretrained`` and ``save_pretrained`` handle
SSF like any built-in method.

That is why the PEFT versions are pinned: :data:`PEFT_RANGE` is the range whose both ends the
test suite runs against (``tests/test_peft.py``, the lower end in a subprocess); another version
is refused at import with the command that installs a supported one.
"""
from __future__ import annotations

import enum

__all__ = ["PEFT_RANGE", "LOWER_END", "register", "add_enum_member", "check_version"]

PEFT_RANGE = (">=0.18.0", "<0.23")    # tested: 0.18.0 and 0.22.x (see tests/test_peft.py)
_LOW, _HIGH = (0, 18, 0), (0, 23, 0)
# the lower end the tests run on (with the oldest transformers tested, as .ci/run installs it);
# the upper end is whatever pip resolves inside the range
LOWER_END = {"peft": "0.18.0", "transformers": "5.20.2"}
NAME = "ssf"


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_version(version: str) -> None:
    """Refuse a PEFT outside :data:`PEFT_RANGE` (its enum and registry are not public API)."""
    if not _LOW <= _version_tuple(version) < _HIGH:
        raise ImportError(f"ssf_deploy.peft supports peft{','.join(PEFT_RANGE)} (tested at both "
                          f"ends); found peft {version}: pip install \"peft{','.join(PEFT_RANGE)}\"")


def add_enum_member(cls: type[enum.Enum], name: str, value) -> enum.Enum:
    """Add member ``name = value`` to an existing ``(str, Enum)`` class, as if it had been
    declared there: lookup by name and value, iteration, ``in``, pickling and JSON work."""
    if name in cls.__members__:
        return cls[name]
    member = str.__new__(cls, value)
    member._name_, member._value_ = name, value
    member.__objclass__ = cls
    if hasattr(cls, "_add_member_"):          # Python >= 3.13
        cls._add_member_(name, member)
    else:
        cls._member_map_[name] = member
        type.__setattr__(cls, name, member)
    if name not in cls._member_names_:        # iteration order (3.13's _add_member_ skips it)
        cls._member_names_.append(name)
    cls._value2member_map_[value] = member
    return member


def register(config_cls, model_cls) -> None:
    """Make ``PeftType.SSF`` exist and register SSF's config and tuner with PEFT (idempotent)."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType, register_peft_method

    check_version(peft.__version__)
    member = add_enum_member(PeftType, NAME.upper(), NAME.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(member) is config_cls:
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls,
                         prefix=model_cls.prefix)
