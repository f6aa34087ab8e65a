"""Where each task's numbers live: one row per task, and the backbone that reads them per sample.

A bundle stores a task as ONE flat float32 row: the task's own tensors, verbatim — every SSF
site's scale and shift, the BatchNorm statistics it trained (BN runs in train mode while SSF
trains, so they are the task's too), then its classifier (weight transposed and padded to the
bundle's widest head, then bias). The graph gathers each sample's row once
(``rows = table[task]``) and every site slices its numbers out of it, so adding a task appends a
row and never touches the backbone graph.

Each site applies ``y = s * x + c`` with per-sample ``s``/``c`` computed from the row on the tiny
``[batch, channels]`` slices, so the per-activation cost is one multiply-add:

* a plain ``nn.Linear``/``nn.ConvNd`` with a bias gives its bias to the shift
  (``gamma * (W x) + (gamma * b + beta)``): the multiply-add replaces the bias add the base graph
  already had;
* an eval BatchNorm is replaced by its per-sample affine with the SSF folded in
  (``gamma * (x - mean) * w / sqrt(var + eps) + gamma * b + beta``);
* a last-dim LayerNorm's own affine takes the factors (``(gamma w) norm(x) + gamma b + beta``),
  and the exported graph gives the per-sample ``[B, 1, C]`` scale and shift to the
  ``LayerNormalization`` node itself (its spec is ``Mul`` + ``Add`` with broadcasting): no pass
  over the activations at all (:func:`ssf_deploy.bundle.files.fuse_norm_affine`);
* anything else (a LayerNorm, a norm+activation's norm output) gets ``gamma * out + beta``.

Sites are the modules that carry the tasks' tensors, found with the SSF tuner's own rules
(:func:`ssf_deploy.tuners.ssf.find_sites`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..models import head_modules
from ..tuners.ssf import find_sites

__all__ = ["Layout", "SiteSlot", "TaskBundleModule", "PARTS", "layout_for", "task_row",
           "state_from_row", "measure_repeats"]

# the task tensors a site can hold, by state-key suffix
PARTS = {"scale": "ssf_scale", "shift": "ssf_shift", "mean": "running_mean",
         "var": "running_var"}
_IGNORED = ("num_batches_tracked",)   # counts BN updates; eval outputs never read it
_STRIPPABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class SiteSlot:
    """One site's place in a task row."""
    name: str                 # module path, e.g. "blocks.0.attn.qkv"
    channels: int
    dim: int                  # channel axis of the module's output (-1 last, 1 channels-first)
    kind: str = "plain"       # "plain" | "linear" (bias -> shift) | "norm" (affine) | "bn"
    parts: dict = field(default_factory=dict)   # part -> [offset, length] in the row
    before_act: bool = False  # norm+act module: applied on the activation's input
    eps: float = 0.0          # BatchNorm epsilon
    repeat: int = 1           # output rows per sample (Swin windows: B * nW rows)


@dataclass
class Layout:
    """The row layout every task of a bundle shares (stored in the bundle's metadata)."""
    sites: list = field(default_factory=list)   # SiteSlot
    head: str = ""                              # classifier module path
    features: int = 0                           # classifier input width D
    max_classes: int = 0                        # logits columns (Cmax)
    head_weight: list = field(default_factory=list)   # [offset, D * Cmax]
    head_bias: list = field(default_factory=list)     # [offset, Cmax]
    live: int = 0                               # offset of the row's "live task" flag (1.0)
    width: int = 0                              # floats per row

    def as_dict(self) -> dict:
        return {**asdict(self), "sites": [asdict(s) for s in self.sites]}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        d = dict(d)
        d["sites"] = [SiteSlot(**s) for s in d.get("sites", [])]
        return cls(**d)

    def keys(self) -> dict:
        """``{task-state key: number of values}`` a row holds."""
        out = {f"{self.head}.weight": None, f"{self.head}.bias": None}
        for s in self.sites:
            for part, (_, n) in s.parts.items():
                out[f"{s.name}.{PARTS[part]}"] = n
        return out


def _classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    heads = head_modules(model)
    if len(heads) != 1 or not isinstance(heads[0], nn.Linear):
        kinds = ", ".join(type(h).__name__ for h in heads) or "none"
        raise UsageError(f"a bundle needs one Linear classifier per task; {type(model).__name__} "
                         f"has {kinds}")
    for name, m in model.named_modules():
        if m is heads[0]:
            return name, m
    raise UsageError("the classifier is not a submodule of the model")  # pragma: no cover


def task_keys(state: dict) -> list:
    """The keys of a task's state that a row holds (BN update counters left out)."""
    return [k for k in state if not k.endswith(_IGNORED)]


def layout_for(model: nn.Module, state: dict, max_classes: int, *,
               fold_bias: bool = True) -> Layout:
    """The row layout for tasks with the keys of ``state`` on ``model``'s architecture (only its
    structure and frozen constants are read). ``fold_bias=False`` keeps every producer's bias in
    the backbone and applies the factors on top (the naive layout, kept for measurement)."""
    head_name, head = _classifier(model)
    head_keys = (f"{head_name}.weight", f"{head_name}.bias")
    by_name = {s.name: s for s in find_sites(model, bias_free=True)}
    owners: dict = {}
    for k in task_keys(state):
        if k in head_keys:
            continue
        owner, _, attr = k.rpartition(".")
        part = next((p for p, suffix in PARTS.items() if attr == suffix), None)
        if part is None or owner not in by_name:
            raise UsageError(f"a bundle task holds SSF factors, BatchNorm statistics and its "
                             f"classifier; this one also trains '{k}'")
        owners.setdefault(owner, set()).add(part)
    if not any({"scale", "shift"} & parts for parts in owners.values()):
        raise UsageError("the task holds no SSF factors: it is not an SSF task")
    if not all(k in state for k in head_keys):
        raise UsageError(f"the task holds no classifier ('{head_name}')")
    layout = Layout(head=head_name, features=int(head.in_features), max_classes=int(max_classes))
    off = 0
    for name, site in by_name.items():          # module order
        if name not in owners:
            continue
        m = site.module
        slot = SiteSlot(name, int(site.channels), int(site.dim), before_act=site.before_act)
        if {"mean", "var"} & owners[name]:
            if not (isinstance(m, nn.modules.batchnorm._BatchNorm) and
                    {"mean", "var"} <= owners[name] and m.track_running_stats):
                raise UsageError(f"'{name}' carries BatchNorm statistics the bundle cannot apply")
            slot.kind, slot.eps = "bn", float(m.eps)
        elif fold_bias and type(m) in _STRIPPABLE and getattr(m, "bias", None) is not None \
                and not site.before_act:
            slot.kind = "linear"
        elif fold_bias and isinstance(m, nn.LayerNorm) and site.dim == -1 and \
                not site.before_act and m.weight is not None and m.bias is not None and \
                not getattr(m, "_fast_norm", False):
            slot.kind = "norm"
        for part in PARTS:
            if part not in owners[name]:
                continue
            n = int(state[f"{name}.{PARTS[part]}"].numel())
            if n != site.channels and not (part == "scale" and n == 1):
                raise UsageError(f"'{name}.{PARTS[part]}' has {n} values; the site has "
                                 f"{site.channels} channels")
            slot.parts[part] = [off, n]
            off += n
        layout.sites.append(slot)
    layout.head_weight = [off, layout.features * layout.max_classes]
    off += layout.head_weight[1]
    layout.head_bias = [off, layout.max_classes]
    layout.live = off + layout.max_classes
    layout.width = layout.live + 1
    return layout


def task_row(layout: Layout, state: dict) -> np.ndarray:
    """One task's row (float32, ``layout.width``); the head is padded with zero columns."""
    row = np.zeros(layout.width, dtype=np.float32)
    for s in layout.sites:
        for part, (o, n) in s.parts.items():
            row[o:o + n] = state[f"{s.name}.{PARTS[part]}"].detach().float().reshape(-1).numpy()
    w = state[f"{layout.head}.weight"].detach().float().cpu()
    b = state[f"{layout.head}.bias"].detach().float().cpu()
    c = int(w.shape[0])
    if c > layout.max_classes or w.shape[1] != layout.features:
        raise UsageError(f"the task's classifier is {tuple(w.shape)}; the bundle holds at most "
                         f"{layout.max_classes} classes of {layout.features} features")
    wt = np.zeros((layout.features, layout.max_classes), dtype=np.float32)
    wt[:, :c] = w.numpy().T
    o, n = layout.head_weight
    row[o:o + n] = wt.reshape(-1)
    o, _ = layout.head_bias
    row[o:o + c] = b.numpy()
    row[layout.live] = 1.0            # a removed task's slot reads a zero row: flag 0
    return row


def state_from_row(layout: Layout, row: np.ndarray, num_classes: int) -> dict:
    """The task state a row holds: the inverse of :func:`task_row`."""
    row = np.asarray(row, dtype=np.float32).reshape(-1)
    out = {}
    for s in layout.sites:
        for part, (o, n) in s.parts.items():
            out[f"{s.name}.{PARTS[part]}"] = torch.from_numpy(row[o:o + n].copy())
    o, n = layout.head_weight
    wt = row[o:o + n].reshape(layout.features, layout.max_classes)
    out[f"{layout.head}.weight"] = torch.from_numpy(np.ascontiguousarray(wt[:, :num_classes].T))
    o, _ = layout.head_bias
    out[f"{layout.head}.bias"] = torch.from_numpy(row[o:o + num_classes].copy())
    return out


def measure_repeats(base: nn.Module, layout: Layout, chw: tuple) -> None:
    """Set each site's ``repeat``: output rows per sample (1, or e.g. Swin's windows per image),
    from forward passes at two batch sizes; a site whose rows do not follow the batch is refused
    (per-sample numbers could not be placed there)."""
    seen: dict = {}
    handles = []
    for slot in layout.sites:
        module = base.get_submodule(slot.name)
        if slot.before_act:
            handles.append(module.act.register_forward_pre_hook(
                lambda m, a, n=slot.name: seen.setdefault(n, []).append(a[0].shape[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, o, n=slot.name: seen.setdefault(n, []).append(o.shape[0])))
    try:
        with torch.no_grad():
            for b in (2, 3):
                base(torch.zeros(b, *chw))
    finally:
        for h in handles:
            h.remove()
    for slot in layout.sites:
        counts = seen.get(slot.name)
        if not counts:
            raise UsageError(f"SSF site '{slot.name}' is not run by the model's forward")
        calls = len(counts) // 2
        first, second = counts[:calls], counts[calls:]
        reps = {a // 2 for a in first} if all(a % 2 == 0 for a in first) else set()
        if len(reps) != 1 or second != [3 * next(iter(reps))] * calls:
            raise UsageError(f"SSF site '{slot.name}' produces {first} rows for 2 images and "
                             f"{second} for 3: its rows do not follow the batch, so per-sample "
                             f"factors cannot be placed there")
        slot.repeat = reps.pop()


# --------------------------------------------------------------------------------------------
# the backbone that applies each sample's row


class _Rows:
    """The gathered rows of the batch being run, shared by every site."""
    value: Optional[torch.Tensor] = None


class _TaskHead(nn.Module):
    """Each sample's own classifier: ``x @ W[task] + b[task]`` as one batched matmul."""

    def __init__(self, rows: _Rows, layout: Layout):
        super().__init__()
        self._rows, self.layout = rows, layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L, rows = self.layout, self._rows.value
        o, n = L.head_weight
        w = rows[:, o:o + n].reshape(-1, L.features, L.max_classes)
        o, n = L.head_bias
        return torch.matmul(x.unsqueeze(1), w).squeeze(1) + rows[:, o:o + n]


def _part(rows: torch.Tensor, slot: SiteSlot, part: str) -> Optional[torch.Tensor]:
    if part not in slot.parts:
        return None
    o, n = slot.parts[part]
    return rows[:, o:o + n]


def _affine(rows: torch.Tensor, slot: SiteSlot, module: nn.Module):
    """This batch's per-sample ``(s, c)`` ([B, C] or None) for ``y = s * x + c``."""
    g, beta = _part(rows, slot, "scale"), _part(rows, slot, "shift")
    if slot.kind == "linear":                    # gamma * (W x) + (gamma * b + beta)
        b = module.bundle_bias
        sb = b if g is None else g * b
        return g, (sb if beta is None else sb + beta)
    if slot.kind == "norm":                      # gamma * (w n + b) + beta
        w, b = module.bundle_weight, module.bundle_bias
        s = w if g is None else g * w
        c = b if g is None else g * b
        return s, (c if beta is None else c + beta)
    if slot.kind == "bn":                        # the task's BN statistics, then its SSF
        mean, var = _part(rows, slot, "mean"), _part(rows, slot, "var")
        a = torch.rsqrt(var + slot.eps)
        if module.weight is not None:
            a = a * module.weight
        d = -mean * a
        if module.bias is not None:
            d = d + module.bias
        s = a if g is None else g * a
        c = d if g is None else g * d
        return s, (c if beta is None else c + beta)
    return g, beta


def _apply(x: torch.Tensor, s: Optional[torch.Tensor], c: Optional[torch.Tensor],
           slot: SiteSlot) -> torch.Tensor:
    """``x * s + c`` with per-sample ``s``/``c`` broadcast along ``slot.dim``."""
    out = x.reshape(-1, slot.repeat, *x.shape[1:]) if slot.repeat > 1 else x
    axis = (slot.dim % x.dim()) + (1 if slot.repeat > 1 else 0)

    def along(v: torch.Tensor) -> torch.Tensor:   # [B, n] -> [B, 1, .., n at axis, .., 1]
        shape = [1] * out.dim()
        shape[0], shape[axis] = -1, v.shape[1]     # -1: the graph's batch stays dynamic
        return v.reshape(shape)

    if s is not None:
        out = out * along(s)
    if c is not None:
        out = out + along(c)
    return out.reshape(x.shape) if slot.repeat > 1 else out


def _bn_forward(module: nn.Module, rows: _Rows, slot: SiteSlot):
    """An eval BatchNorm (or timm's norm+act) as this batch's per-sample affine."""
    def forward(x):
        s, c = _affine(rows.value, slot, module)
        x = _apply(x, s, c, slot)
        for tail in ("drop", "act"):      # timm BatchNormAct2d: norm -> drop -> act
            if isinstance(getattr(module, tail, None), nn.Module):
                x = getattr(module, tail)(x)
        return x
    return forward


class TaskBundleModule(nn.Module):
    """The base architecture running every sample with its own task's row.

    ``forward(images, task, table)``: ``table`` is the ``[tasks, width]`` row table (default: the
    module's ``table`` buffer); the ONNX export passes it as an input, which the bundle writer
    turns into the concatenation of one initializer per task. ``base`` is changed in place.
    """

    def __init__(self, base: nn.Module, layout: Layout, table: Optional[torch.Tensor] = None):
        super().__init__()
        self.layout = layout
        self._rows = _Rows()
        self.net = base
        parent_name, _, attr = layout.head.rpartition(".")
        parent = self.net.get_submodule(parent_name) if parent_name else self.net
        setattr(parent, attr, _TaskHead(self._rows, layout))
        for slot in layout.sites:
            module = self.net.get_submodule(slot.name)
            if slot.kind == "bn":
                module.eval()
                module.forward = _bn_forward(module, self._rows, slot)
                continue
            if slot.kind == "linear":
                bias = module.bias.detach().clone()
                module.bias = None
                module.register_buffer("bundle_bias", bias)
            elif slot.kind == "norm":
                weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
                module.weight, module.bias = None, None
                module.register_buffer("bundle_weight", weight)
                module.register_buffer("bundle_bias", bias)
            self._hook(module, slot)
        self.register_buffer("table", table if table is not None else
                             torch.zeros(0, layout.width), persistent=False)

    def _hook(self, module: nn.Module, slot: SiteSlot) -> None:
        rows = self._rows

        def run(x):
            s, c = _affine(rows.value, slot, module)
            return _apply(x, s, c, slot)
        if slot.before_act:
            module.act.register_forward_pre_hook(lambda m, args: (run(args[0]), *args[1:]))
        else:
            module.register_forward_hook(lambda m, args, out: run(out))

    def forward(self, images: torch.Tensor, task: torch.Tensor,
                table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits; a sample whose task index is out of range or removed gets NaN logits, never
        another task's, and never fails the rest of its batch."""
        table = self.table if table is None else table
        inside = (task >= 0) & (task < table.shape[0])
        rows = table[torch.where(inside, task, torch.zeros_like(task))]
        self._rows.value = rows
        try:
            logits = self.net(images)
        finally:
            self._rows.value = None
        ok = inside & (rows[:, self.layout.live] > 0)
        return torch.where(ok.unsqueeze(1), logits, torch.full_like(logits, float("nan")))
