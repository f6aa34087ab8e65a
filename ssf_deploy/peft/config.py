"""``SSFConfig``: SSF's options in PEFT's conventions (``target_modules``, ``exclude_modules``,
``modules_to_save``, ``layers_to_transform``/``layers_pattern``, ``init_*_weights``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..tuners.ssf import INITS

__all__ = ["SSFConfig"]


@dataclass
class SSFConfig(PeftConfig):
    """Configuration of :class:`~ssf_deploy.peft.SSFModel` (SSF, Lian et al., NeurIPS 2022).

    SSF puts a learnable per-channel ``y = scale * x + shift`` after every operation with a linear
    coefficient; after training it folds into the weights of the model it tunes
    (``merge_and_unload``: the base class with new weights, nothing added).

    Args:
        target_modules: modules to tune: names (exact, or a ``.name`` suffix), a regex, or
            ``"all-linear"`` (PEFT's shorthand: Linear layers only). ``None`` (default): the
            paper's placement, every Linear and Conv that has a bias and every norm (LayerNorm,
            BatchNorm, GroupNorm), the model's output layer (classifier) excepted.
        exclude_modules: names or a regex never tuned.
        modules_to_save: modules trained in full and saved with the adapter (a classifier
            head: PEFT adds ``classifier``/``score`` itself for ``task_type="SEQ_CLS"``).
        layers_to_transform / layers_pattern: only the blocks with these indices (the paper's
            Table 6a, "SSF in the first N blocks": ``layers_to_transform=list(range(N))``).
        bias_free: also tune Linear/Conv layers without a bias when ``target_modules`` is None
            (their shift then has no bias to fold into, so the merge may have to refuse them).
        scale / shift / scalar_scale: Table 6d (shift only, scale only, one scale per layer).
        init_ssf_weights: Table 6c: ``"normal"`` (the paper's default, also ``True``),
            ``"trunc_normal"``, ``"uniform"``, ``"constant"`` (identity: scale 1, shift 0),
            ``"random"`` (both centred at 0; also ``False``).
        init_std: the spread of the initialisation around scale 1 / shift 0.
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "Modules to tune (names, a regex, or 'all-linear'); None: every Linear/Conv with "
                "a bias and every norm except the output layer (the paper's placement)."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "Module names or a regex never tuned."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={
        "help": "Modules trained in full and saved with the adapter (e.g. the classifier)."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={
        "help": "Only the blocks with these indices (Table 6a)."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "Name of the block list, e.g. 'layer' (with layers_to_transform)."})
    bias_free: bool = field(default=False, metadata={
        "help": "Default targets include Linear/Conv without a bias."})
    scale: bool = field(default=True, metadata={"help": "Learn a scale (Table 6d)."})
    shift: bool = field(default=True, metadata={"help": "Learn a shift (Table 6d)."})
    scalar_scale: bool = field(default=False, metadata={"help": "One scale per layer (Table 6d)."})
    init_ssf_weights: Union[bool, str] = field(default=True, metadata={
        "help": f"Initialisation (Table 6c): {', '.join(INITS)}; True = normal, False = random."})
    init_std: float = field(default=0.02, metadata={"help": "Spread of the initialisation."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SSF
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))
        if not (self.scale or self.shift):
            raise ValueError("SSFConfig needs at least one of scale and shift")
        if self.init_method not in INITS:
            raise ValueError(f"init_ssf_weights must be True, False or one of {', '.join(INITS)}; "
                             f"got {self.init_ssf_weights!r}")
        if not self.init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std!r}")

    @property
    def init_method(self) -> str:
        """The Table 6c initialisation ``init_ssf_weights`` names."""
        if self.init_ssf_weights is True:
            return "normal"
        if self.init_ssf_weights is False:
            return "random"
        return self.init_ssf_weights
