"""Fold SSF into the base weights (paper Eq. 5) with a graph pass over ``torch.export``'s trace.

Every SSF runs as one ``ssf_deploy::scale_shift`` node while tracing, so its producer is simply
the node that feeds it — found in the graph, never guessed from module names. For each SSF the
pass prefers, in this order, whatever keeps the deployed graph identical to the base model:

1. fold back into the producer (Linear, Conv incl. grouped/depthwise, LayerNorm, GroupNorm,
   BatchNorm in eval): ``W' = gamma * W``, ``b' = gamma * b + beta``;
2. fold forward into every consumer (Linear; Conv when exact — zero padding makes a constant
   shift position-dependent, so only a zero shift or an unpadded conv qualify; BatchNorm in eval):
   ``W' = W diag(gamma)``, ``b' = b + W beta``;
3. fold back and give the producer the bias/affine it lacks — reported, since the base graph then
   gains a node.

A model rebuilt with *graph edits* (``ssf_deploy.models``: what a checkpoint's own forward
computes beyond the timm architecture) is handled first. An edit that says how it folds (a
per-channel affine at the end of a residual stream: the official SSF ConvNeXt's last factor) is
folded exactly in float64 into the stream's SSF factors, which then fold like any other; where
that is not exact in float32 for some channel, only the part that cannot fold stays, as the
fewest extra nodes, reported (like 3.). An edit with no fold at all (norm_pre applied twice) is
kept only with ``allow_extra_nodes=True``, reported as +N nodes; otherwise it is refused.

A module called several times (timm's CoaT shares one ConvPosEnc between serial blocks) runs its
SSF hook on every call: when every call of the shared weights carries the same factors they fold
into them once; calls that would need different folds are refused with the module named.

Anything else (a non-linear producer whose consumers cannot absorb the factors, a producer
output that another op also reads) is refused with the module named: a fused model is exact or it
is not returned. The maths runs in float64 and is cast back.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .errors import FuseError, first_line
from .layers.scale_shift import ssf_mode
from .models import (CREATE_RECORD, apply_edits, call_args, creation_record, describe_edit,
                     edits_of, example_input, family_of, inputs_to, plain_architecture,
                     plain_state)
from .runtime.keys import key_diff
from .tuners import get_tuner, method_of, unload

__all__ = ["fuse", "fuse_with_report", "fuse_many", "fold_ssf", "FuseReport", "Fold", "FP16_MAX",
           "base_of"]

FP16_MAX = 65504.0   # the largest finite float16

aten = torch.ops.aten
_SSF = torch.ops.ssf_deploy.scale_shift.default
_SSF_KEYS = ("ssf_scale", "ssf_shift")

# producer op -> (kind, weight arg, bias arg, channel axis of its output: -1 last, 1 channels)
_PRODUCERS = {
    aten.linear.default: ("linear", 1, 2, -1),
    aten.conv1d.default: ("conv", 1, 2, 1),
    aten.conv2d.default: ("conv", 1, 2, 1),
    aten.conv3d.default: ("conv", 1, 2, 1),
    aten.conv1d.padding: ("conv", 1, 2, 1),
    aten.conv2d.padding: ("conv", 1, 2, 1),
    aten.conv3d.padding: ("conv", 1, 2, 1),
    aten.layer_norm.default: ("norm", 2, 3, -1),
    aten.group_norm.default: ("norm", 2, 3, 1),
    aten.batch_norm.default: ("norm", 1, 2, 1),
}
# ops that only move data: the channel follows the permutation, values are untouched
_PASS = {aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
         aten.detach.default, aten.permute.default, aten.feature_dropout.default}


@dataclass
class Fold:
    site: str            # module that carried the SSF factors
    how: str             # "producer", "consumer" or "producer+new"
    targets: list        # modules whose weights absorbed it
    op: str              # producer op
    calls: int = 1       # calls of a shared producer folded at once (same factors on every call)


@dataclass
class FuseReport:
    folds: list = field(default_factory=list)
    added: list = field(default_factory=list)      # (param name, reason)
    keys_match_base: bool = True
    extra_nodes: list = field(default_factory=list)   # (module path, what the graph gains)
    edits_folded: list = field(default_factory=list)  # graph edits folded away exactly
    largest: Optional[tuple] = None   # (tensor, |value|): the largest value the fold wrote

    def as_dict(self) -> dict:
        largest = None
        if self.largest is not None:
            name, value = self.largest
            largest = {"tensor": name, "abs": value, "fp16_max": FP16_MAX,
                       "beyond_fp16": not value <= FP16_MAX}
        changed = self.added or self.extra_nodes
        return {"folded": len(self.folds),
                "by_kind": {k: sum(f.how == k for f in self.folds)
                            for k in ("producer", "consumer", "producer+new")},
                "added_parameters": [{"name": n, "reason": r} for n, r in self.added],
                "extra_nodes": [{"where": w, "what": t} for w, t in self.extra_nodes],
                "edits_folded": list(self.edits_folded),
                "largest_folded_value": largest,
                "keys_match_base": self.keys_match_base,
                "graph_changes": "none" if not changed else
                "the base graph gains the ops that apply the added parameters / modules"}

    def __str__(self) -> str:
        d = self.as_dict()
        kinds = ", ".join(f"{v} {k}" for k, v in d["by_kind"].items() if v)
        lines = [f"fused {d['folded']} SSF site(s) ({kinds or 'none'})"]
        lines += [f"folded: {n}" for n in self.edits_folded]
        if self.added or self.extra_nodes:
            lines.append("WARNING: the fused model is NOT the unchanged base graph; it gains:")
            lines += [f"  + {n}: {r}" for n, r in self.added]
            lines += [f"  + {t}" for _, t in self.extra_nodes]
        else:
            lines.append("fused model = unchanged base architecture (same keys and shapes)")
        if self.largest is not None:
            name, value = self.largest
            fits = f"fits fp16 (max {FP16_MAX:g})" if value <= FP16_MAX else \
                f"BEYOND fp16's {FP16_MAX:g}: an fp16 engine cannot hold it"
            lines.append(f"largest value the fold wrote: {value:.3g} in {name}; {fits}")
        return "\n".join(lines)


def fuse(model: nn.Module, example: Optional[torch.Tensor] = None, *,
         allow_extra_nodes: bool = False) -> nn.Module:
    """Return the base architecture holding the folded weights; ``model`` is left untouched."""
    return fuse_with_report(model, example, allow_extra_nodes=allow_extra_nodes)[0]


def fuse_with_report(model: nn.Module, example: Optional[torch.Tensor] = None, *,
                     allow_extra_nodes: bool = False) -> tuple[nn.Module, "FuseReport"]:
    """:func:`fuse`, and what it did: which sites folded where, parameters the base gained.

    ``allow_extra_nodes``: deploy a model whose graph edits cannot fold (see the module
    docstring) as the base graph plus those nodes, reported, instead of refusing it."""
    meta = method_of(model)
    method = meta["method"] if meta else None
    if method is not None and not get_tuner(method).fusable:
        raise FuseError(f"method '{method}' adds modules or tokens that stay at inference; only "
                        f"ssf (and the plain methods full/linear/bias) fuse to the base")
    report = FuseReport()
    # fold on the CPU (float64 maths, no device mixing); the result goes back where the model was
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtypes = {k: v.dtype for k, v in state.items()}
    kept = _fold_edits(model, state, report, allow_extra_nodes)
    if method == "ssf" or any(k.endswith(_SSF_KEYS) for k in state):
        state = _fold(model, state, example, report, dtypes)
    state = {k: v for k, v in state.items() if not k.endswith(_SSF_KEYS)}
    base = _build_base(model, state, report, kept).to(device)
    base.eval()
    return base, report


def base_of(model: nn.Module) -> nn.Module:
    """The plain base architecture holding ``model``'s own (unfused) base tensors: what the
    deployed graph is compared with. Built like the fused model (no copy of the weights: the
    tensors are shared), so it costs no more than a view of ``model``."""
    if creation_record(model) is None:
        return plain_architecture(unload(copy.deepcopy(model)))
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith(_SSF_KEYS)}
    state = plain_state(state, edits_of(model))
    ref = next(model.parameters(), None)
    return _build_base(model, state, FuseReport(), {}).to(
        ref.device if ref is not None else "cpu").eval()


# --------------------------------------------------------------------------------------------
# tracing and planning


def _trace(model: nn.Module, example: Optional[torch.Tensor]):
    if example is None:
        example = example_input(model, batch=2)
    ref = next(model.parameters(), None)
    if ref is not None:
        example = inputs_to(example, ref.device, ref.dtype if ref.is_floating_point() else None)
    args, kwargs = call_args(example)   # a tensor, or named inputs (text: input_ids, ...)
    was_training = model.training
    model.eval()
    try:
        with ssf_mode("graph"), torch.no_grad():
            return torch.export.export(model, args, kwargs, strict=False)
    except FuseError:
        raise
    except Exception as e:
        raise FuseError(f"cannot trace {type(model).__name__} for fusion: {first_line(e)}") from e
    finally:
        model.train(was_training)


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<model>"
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "") or "<model>"


class _Graph:
    """Names for placeholders and use counts, so weight sharing is visible."""

    def __init__(self, ep):
        sig = ep.graph_signature
        self.names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.uses: dict[str, int] = {}
        self.users: dict[str, list] = {}   # fq name -> the call_function nodes reading it
        for n in ep.graph.nodes:
            if n.op == "call_function":
                for a in n.args:
                    if isinstance(a, torch.fx.Node) and a.name in self.names:
                        fq = self.names[a.name]
                        self.uses[fq] = self.uses.get(fq, 0) + 1
                        self.users.setdefault(fq, []).append(n)

    def name(self, arg) -> Optional[str]:
        return self.names.get(arg.name) if isinstance(arg, torch.fx.Node) else None


def _ndim(node) -> int:
    val = node.meta.get("val")
    return val.dim() if val is not None else 0


def _arg(node, i, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(
        {1: "weight", 2: "bias"}.get(i, ""), default)


def _walk_back(x, dim: int):
    """Follow data-only ops back to the real producer; None if anything else reads the path."""
    axis = dim % max(_ndim(x), 1)
    while x.op == "call_function" and x.target in _PASS:
        if len(x.users) != 1:
            return None, None
        if x.target is aten.permute.default:
            axis = list(x.args[1])[axis] % _ndim(x.args[0])
        x = x.args[0]
    if x.op != "call_function" or x.target not in _PRODUCERS or len(x.users) != 1:
        return None, None
    kind, _, _, ch = _PRODUCERS[x.target]
    if axis != ch % _ndim(x):
        return None, None
    if x.target is aten.batch_norm.default and x.args[5]:
        return None, None   # batch statistics: not an affine map
    return x, axis


# --------------------------------------------------------------------------------------------
# the fold maths, written once


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def _along(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _scale_shift_out(w, b, gamma, beta, out_axis: int):
    """Producer side: y = gamma*(W t + b) + beta  ->  W' = gamma W, b' = gamma b + beta."""
    w2 = w * _along(gamma, out_axis, w.dim()) if w is not None else None
    b2 = gamma * b if b is not None else None
    if beta is not None:
        b2 = beta.clone() if b2 is None else b2 + beta
    return w2, b2


def _linear_in(w, b, gamma, beta):
    """Consumer Linear: W (gamma x + beta) + b -> (W diag gamma) x + (W beta + b)."""
    b2 = b
    if beta is not None:
        b2 = (w @ beta) + (b if b is not None else 0)
    return w * gamma.reshape(1, -1), b2


def _conv_in(w, b, gamma, beta, groups: int):
    """Consumer conv, per input channel (grouped/depthwise aware); beta only when exact."""
    out_c, in_g = w.shape[:2]
    wg = w.reshape(groups, out_c // groups, in_g, *w.shape[2:])
    g = gamma.reshape(groups, 1, in_g, *([1] * (w.dim() - 2)))
    b2 = b
    if beta is not None:
        bb = beta.reshape(groups, 1, in_g, *([1] * (w.dim() - 2)))
        b2 = (wg * bb).sum(dim=tuple(range(2, wg.dim()))).reshape(out_c) + \
            (b if b is not None else 0)
    return (wg * g).reshape(w.shape), b2


def _bn_in(w, b, mean, var, eps, gamma, beta):
    """Consumer BatchNorm (eval): keep the statistics, fold into its affine (it has one:
    ``consumers_accept`` only lets affine BatchNorms through)."""
    beta = beta if beta is not None else torch.zeros_like(mean)
    std = torch.sqrt(var + eps)
    return w * gamma, b + w * (beta - mean + gamma * mean) / std


# --------------------------------------------------------------------------------------------


class _Folder:
    def __init__(self, state, ep, report, dtypes: dict):
        self.state, self.report = dict(state), report
        self.g = _Graph(ep)
        self.work: dict[str, torch.Tensor] = {}
        self.dtypes = dict(dtypes)   # what each tensor is stored as (edits may hand float64)
        # tied tensors (one Parameter under several names): the trace names one, all must follow
        groups: dict = {}
        for k, v in state.items():
            if v.numel():
                groups.setdefault((v.data_ptr(), v.dtype, tuple(v.shape), v.stride()), []).append(k)
        self.aliases = {k: g for g in groups.values() if len(g) > 1 for k in g}

    def get(self, name: Optional[str]):
        if name is None:
            return None
        if name not in self.work:
            self.work[name] = _f64(self.state[name])
        return self.work[name]

    def put(self, name: str, value: torch.Tensor, like: Optional[str] = None, reason: str = ""):
        if name not in self.state and name not in self.work:
            self.report.added.append((name, reason))
            self.dtypes[name] = self.dtypes.get(like, torch.float32)
        self.work[name] = value

    def factors(self, node):
        scale_name, shift_name = self.g.name(node.args[1]), self.g.name(node.args[2])
        site = (scale_name or shift_name or _module_of(node)).rsplit(".", 1)[0]
        gamma, beta = self.get(scale_name), self.get(shift_name)
        channels = node.meta["val"].shape[node.args[3]]
        if gamma is None:
            gamma = torch.ones(channels, dtype=torch.float64)
        elif gamma.numel() == 1:
            gamma = gamma.expand(channels).clone()
        return site, gamma, beta

    # ---- producer side
    def producer_params(self, prod):
        kind, wi, bi, _ = _PRODUCERS[prod.target]
        w_name, b_name = self.g.name(_arg(prod, wi)), self.g.name(_arg(prod, bi))
        shared = [n for n in (w_name, b_name) if n and self.g.uses.get(n, 0) > 1]
        owner = _module_of(prod)
        return kind, w_name, b_name, owner, shared

    def fold_back(self, site, prod, gamma, beta, *, allow_new: bool, calls: int = 1):
        kind, w_name, b_name, owner, shared = self.producer_params(prod)
        if shared and calls == 1:
            return False   # shared weights: only with every call's factors checked (shared_calls)
        needs_bias = beta is not None and b_name is None
        needs_weight = w_name is None and not bool((gamma == 1).all())
        if (needs_bias or needs_weight) and not allow_new:
            return False
        w, b = self.get(w_name), self.get(b_name)
        if kind == "norm" and w is None:
            w = torch.ones_like(gamma)
        w2, b2 = _scale_shift_out(w, b, gamma, beta, 0)   # out channels lead every weight
        prefix = owner + "." if owner != "<model>" else ""
        if w_name is not None:
            self.put(w_name, w2)
        elif needs_weight:
            self.put(prefix + "weight", w2, reason=f"{owner} had no affine weight to take the SSF "
                                                   f"scale of {site}")
        if b2 is not None:
            if b_name is not None:
                self.put(b_name, b2)
            else:
                self.put(prefix + "bias", b2, like=w_name,
                         reason=f"{owner} had no bias to take the SSF shift of {site}")
        return True

    def shared_calls(self, prod, ssf_of: dict):
        """(calls, None) when ``prod``'s weights are shared by several calls that all carry the same
        SSF factors (fold once), (None, why) when they are shared otherwise, (None, None) if unshared.
        """
        kind, w_name, b_name, owner, shared = self.producer_params(prod)
        if not shared:
            return None, None
        _, wi, bi, _ = _PRODUCERS[prod.target]
        calls = []
        for name in (w_name, b_name):
            for n in self.g.users.get(name, []) if name else []:
                if n not in calls:
                    calls.append(n)
        mine = (w_name, b_name)
        site = _module_of(prod)
        for c in calls:
            if c.target is not prod.target or \
                    (self.g.name(_arg(c, wi)), self.g.name(_arg(c, bi))) != mine:
                return None, (f"its producer {site}'s weights are also read by "
                              f"{str(c.target).replace('aten.', '')} in {_module_of(c)}")
        first = None
        for c in calls:
            node = ssf_of.get(c)
            factors = self.factors(node)[1:] if node is not None else None
            if factors is None or (first is not None and not _same_factors(first, factors)):
                return None, (f"its producer {site} is called {len(calls)} times and the calls "
                              f"would need different folds (SSF on "
                              f"{sum(ssf_of.get(x) is not None for x in calls)} of them"
                              f"{'' if factors is None else ', with different factors'})")
            first = first or factors
        return [ssf_of[c] for c in calls], None

    # ---- consumer side
    def consumers_accept(self, node, beta_present: bool) -> bool:
        users = list(node.users)
        if not users:
            return False
        axis, ndim = node.args[3] % _ndim(node), _ndim(node)
        for u in users:
            rule = _CONSUMERS.get(u.target) if u.op == "call_function" else None
            if rule is None or not u.args or u.args[0] is not node:
                return False
            if any(a is node for a in u.args[1:]) or self.g.name(u.args[1]) is None:
                return False   # the factors must meet a real weight, once
            names = [self.g.name(a) for a in u.args[1:] if self.g.name(a)]
            if any(self.g.uses.get(n, 0) > 1 for n in names):
                return False
            if not rule.accepts(self.g, u, axis, ndim, beta_present):
                return False
        return True

    def fold_forward(self, node, gamma, beta):
        targets = []
        for u in node.users:
            owner = _module_of(u)
            targets.append(owner)
            _CONSUMERS[u.target].fold(self, u, owner, gamma, beta)
        return targets

    def put_bias(self, b_name, owner, w_name, b2):
        if b2 is not None:
            self.put(b_name or f"{owner}.bias", b2, like=w_name,
                     reason=f"{owner} had no bias to take an SSF shift")

    def finish(self) -> dict:
        out = dict(self.state)
        largest = None
        for k, v in self.work.items():
            v = v.to(self.dtypes.get(k, torch.float32))
            for name in self.aliases.get(k, [k]):
                out[name] = v
            if v.numel() and v.is_floating_point() and not k.endswith(_SSF_KEYS):
                m = float(v.abs().max())
                if largest is None or not m <= largest[1]:
                    largest = (k, m)
        self.report.largest = largest
        return out


# --------------------------------------------------------------------------------------------
# consumer rules: how an op absorbs a per-channel affine on its *input*, one entry per aten op


@dataclass(frozen=True)
class _Consumer:
    accepts: Callable   # (graph names, node, channel axis, ndim, shift present) -> exact?
    fold: Callable      # (folder, node, owner module, gamma, beta) -> None


def _fold_linear(f: _Folder, u, owner, gamma, beta):
    w_name, b_name = f.g.name(u.args[1]), f.g.name(_arg(u, 2))
    w2, b2 = _linear_in(f.get(w_name), f.get(b_name), gamma, beta)
    f.put(w_name, w2)
    f.put_bias(b_name, owner, w_name, b2)


def _conv_exact(g, u, axis, ndim, has_beta):
    padding = list(u.args[4]) if len(u.args) > 4 else [0]
    # zero padding makes a constant shift position-dependent near the border
    return axis == 1 and not (has_beta and any(p != 0 for p in padding))


def _fold_conv(f: _Folder, u, owner, gamma, beta):
    w_name, b_name = f.g.name(u.args[1]), f.g.name(_arg(u, 2))
    groups = int(u.args[6]) if len(u.args) > 6 else 1
    w2, b2 = _conv_in(f.get(w_name), f.get(b_name), gamma, beta, groups)
    f.put(w_name, w2)
    f.put_bias(b_name, owner, w_name, b2)


def _bn_exact(g, u, axis, ndim, has_beta):
    # eval statistics (not training), and a named affine and running stats to absorb into
    return axis == 1 and not u.args[5] and all(g.name(u.args[i]) for i in (1, 2, 3, 4))


def _fold_bn(f: _Folder, u, owner, gamma, beta):
    names = [f.g.name(u.args[i]) for i in (1, 2, 3, 4)]
    w, b, mean, var = (f.get(n) for n in names)
    w2, b2 = _bn_in(w, b, mean, var, float(u.args[7]), gamma, beta)
    f.put(names[0], w2)
    f.put(names[1], b2)


_LINEAR = _Consumer(lambda g, u, axis, ndim, has_beta: axis == ndim - 1, _fold_linear)
_CONV = _Consumer(_conv_exact, _fold_conv)
_CONSUMERS = {
    aten.linear.default: _LINEAR,
    aten.conv1d.default: _CONV,
    aten.conv2d.default: _CONV,
    aten.conv3d.default: _CONV,
    aten.batch_norm.default: _Consumer(_bn_exact, _fold_bn),
}


def _same_factors(a, b) -> bool:
    """Two (gamma, beta) pairs that fold identically (beta None = zero shift)."""
    (ga, ba), (gb, bb) = a, b
    ba = ba if ba is not None else torch.zeros_like(ga)
    bb = bb if bb is not None else torch.zeros_like(gb)
    return ga.shape == gb.shape and torch.equal(ga, gb) and torch.equal(ba, bb)


def fuse_many(model: nn.Module, states, example: Optional[torch.Tensor] = None):
    """Fuse several tasks of one tuned architecture with ONE trace: yields ``(fused, report)``
    for each full state dict in ``states`` (``model``'s keys, another task's values).

    What each fold does depends only on the graph and on the values it reads, so the trace is
    shared; a bundle's exactness gate fuses every task this way. Graph edits (official ConvNeXt)
    are not taken: a task pack cannot hold them.
    """
    meta = method_of(model)
    if meta is None or meta["method"] != "ssf":
        raise FuseError("fuse_many folds SSF tasks: the model must carry method 'ssf'")
    if edits_of(model):
        raise FuseError("fuse_many folds plain SSF tasks: this model carries graph edits")
    ep = _trace(model, example)
    for st in states:
        report = FuseReport()
        state = {k: v.detach().cpu() for k, v in st.items()}
        dtypes = {k: v.dtype for k, v in state.items()}
        state = {k: v for k, v in _fold_traced(ep, state, report, dtypes).items()
                 if not k.endswith(_SSF_KEYS)}
        yield _build_base(model, state, report, {}).eval(), report


def _fold(model, state, example, report: FuseReport, dtypes: dict) -> dict:
    return _fold_traced(_trace(model, example), state, report, dtypes)


def _fold_traced(ep, state, report: FuseReport, dtypes: dict) -> dict:
    folder = _Folder(state, ep, report, dtypes)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is _SSF]
    producers = {node: _walk_back(node.args[0], node.args[3])[0] for node in nodes}
    ssf_of = {prod: node for node, prod in producers.items() if prod is not None}
    done = set()
    for node in nodes:
        if node in done:
            continue
        site, gamma, beta = folder.factors(node)
        prod = producers[node]
        op = str(prod.target).replace("aten.", "") if prod is not None else \
            str(getattr(node.args[0], "target", node.args[0]))
        has_beta = beta is not None and bool(beta.abs().max() > 0)
        beta = beta if has_beta else None
        calls, why_shared = folder.shared_calls(prod, ssf_of) if prod is not None else (None, None)
        n_calls = len(calls) if calls else 1
        if prod is not None and not why_shared and \
                folder.fold_back(site, prod, gamma, beta, allow_new=False, calls=n_calls):
            report.folds.append(Fold(site, "producer", [_module_of(prod)], op, n_calls))
            done.update(calls or ())
        elif folder.consumers_accept(node, has_beta):
            targets = folder.fold_forward(node, gamma, beta)
            report.folds.append(Fold(site, "consumer", targets, op))
        elif prod is not None and not why_shared and \
                folder.fold_back(site, prod, gamma, beta, allow_new=True, calls=n_calls):
            report.folds.append(Fold(site, "producer+new", [_module_of(prod)], op, n_calls))
            done.update(calls or ())
        else:
            why = why_shared or ("its producer '" + op + "' is not a linear op it can fold into")
            raise FuseError(f"cannot fuse SSF at '{site}' exactly: {why}, and its consumers "
                            f"cannot absorb it (only Linear, unpadded Conv and eval "
                            f"BatchNorm can)")
    return folder.finish()


def fold_ssf(model: nn.Module, example=None) -> tuple[dict, FuseReport]:
    """Fold every SSF of ``model`` with the graph pass above, without building anything.

    Returns the tensors the fold rewrote (under ``model``'s own state-dict names, in their
    dtypes; the SSF factors it read are among them) and the report. For tuners that keep their
    own module structure and swap the values in place (PEFT's ``merge_and_unload``).
    """
    report = FuseReport()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    folded = _fold(model, state, example, report, {k: v.dtype for k, v in state.items()})
    return {k: v for k, v in folded.items() if v is not state.get(k)}, report


# --------------------------------------------------------------------------------------------
# graph edits: fold them away when exact, else keep the fewest nodes (reported) or refuse


def _fold_edits(model: nn.Module, state: dict, report: FuseReport,
                allow_extra_nodes: bool) -> dict:
    """Fold or keep each graph edit of ``model`` (``state`` is changed in place); returns the
    edits the fused base keeps."""
    kept = {}
    for path, spec in sorted(edits_of(model).items()):
        fold = spec.get("fold") or {}
        if fold.get("kind") == "residual-stream":
            rest, note = _fold_residual_stream(path, spec, fold, state, model)
            report.edits_folded += [note] if rest is None else []
            if rest is not None:   # exact only in part: the fewest nodes, as producer+new does
                kept[path] = rest
                report.extra_nodes.append((path, f"{describe_edit(path, rest)} ({note})"))
            continue
        if not allow_extra_nodes:
            raise FuseError(f"cannot deploy as the base graph: {describe_edit(path, spec)}; no "
                            f"fold removes it. Pass `allow_extra_nodes` "
                            f"for an exact deployable with that extra node, reported as such")
        kept[path] = spec
        report.extra_nodes.append((path, f"{describe_edit(path, spec)} (--allow-extra-nodes)"))
    return kept


def _normal_f32(v: torch.Tensor) -> bool:
    """Every value stays a finite, normal float32 (or an exact zero): relative rounding only."""
    v32 = v.to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return bool(torch.isfinite(v32).all()) and not bool(((v != 0) & (v32.abs() < tiny)).any())


def _fold_residual_stream(path: str, spec: dict, fold: dict, state: dict, model: nn.Module
                          ) -> tuple[Optional[dict], str]:
    """Fold ``y = s * x_n + t`` at the end of a residual stream into the stream's SSF factors.

    The stream ``x_0 = entry(u)``, ``x_j = x_{j-1} + g_j * m_j`` (``m_j`` ends with the writer's
    SSF; the branch starts with the reader, a depthwise conv with bias c, the only other reader
    of the stream) then carries ``s * x_j``; nothing constant enters it before the end, so the
    readers' zero padding stays exact:

    * entry SSF (a, b) -> (s a, s b), so ``x'_0 = s x_0``;
    * reader: ``r(s x) = s r(x) + (1 - s) c``, so its SSF (a, b) -> (a / s, b - a (1-s) c / s);
    * writer: ``s (g m) = g (s m)``: (a, b) -> (s a, s b), and the last one's shift + t / g.

    Computed in float64 and folded into the weights with them (the reader's bias becomes
    ``a c + b`` again: no cancellation at run time). Exact in float32 when every new factor is a
    finite normal float32: the stream's values are scaled, the branches see what they saw, and
    ``t / g`` is added to a bias that ``g`` multiplies again (``|t| * eps`` after the product,
    however small ``g``). Returns ``(None, note)`` when folded, else ``(the edit that stays,
    why)``: the whole affine where some ``s`` is 0 (the stream would carry 0), only the shift
    where some ``g`` is 0 but ``t`` is not there.
    """
    w_key, b_key = f"{path}.weight", f"{path}.bias"
    root = fold["container"]
    try:
        container = model.get_submodule(root)
        blocks = list(container.get_submodule(fold["blocks"]))
        c = int(blocks[0].get_submodule(fold["reader"]).out_channels)
    except (AttributeError, TypeError, IndexError):
        return spec, f"{root} has no residual stream of {fold['blocks']} to fold it through"
    s = _f64(state.get(w_key)) if w_key in state else torch.ones(c, dtype=torch.float64)
    t = _f64(state.get(b_key)) if b_key in state else torch.zeros(c, dtype=torch.float64)
    sites = [f"{root}.{fold['entry']}"]
    for j, blk in enumerate(blocks):
        prefix = f"{root}.{fold['blocks']}.{j}"
        reader = blk.get_submodule(fold["reader"])
        if not (isinstance(reader, nn.Conv2d) and reader.groups == reader.in_channels ==
                reader.out_channels == c) or \
                not isinstance(getattr(blk, "shortcut", nn.Identity()), nn.Identity):
            return spec, f"{prefix} is not a depthwise-conv block with an identity shortcut"
        sites += [f"{prefix}.{fold['reader']}", f"{prefix}.{fold['writer']}"]
    lacking = [x for x in sites if f"{x}.ssf_scale" not in state or f"{x}.ssf_shift" not in state]
    if lacking:
        return spec, f"no SSF factors at {lacking[0]} to fold it into"
    zero = (s == 0).nonzero().flatten()
    if len(zero):
        return spec, (f"scale 0 at channel {int(zero[0])}: the stream cannot carry it, so the "
                      f"affine stays")
    last = f"{root}.{fold['blocks']}.{len(blocks) - 1}.{fold['layer_scale']}"
    g = _f64(state[last]) if last in state else torch.ones(c, dtype=torch.float64)
    stuck = ((g == 0) & (t != 0)).nonzero().flatten()
    fold_t = not len(stuck)
    new = {}

    def factors(site):
        return _f64(state[f"{site}.ssf_scale"]), _f64(state[f"{site}.ssf_shift"])
    a, b = factors(sites[0])
    new[sites[0]] = (s * a, s * b)
    for j in range(len(blocks)):
        prefix = f"{root}.{fold['blocks']}.{j}"
        reader, writer = f"{prefix}.{fold['reader']}", f"{prefix}.{fold['writer']}"
        bias = _f64(state.get(f"{reader}.bias"))
        bias = bias if bias is not None else torch.zeros(c, dtype=torch.float64)
        a, b = factors(reader)
        new[reader] = (a / s, b - a * (1 - s) * bias / s)
        a, b = factors(writer)
        shift = s * b
        if j == len(blocks) - 1 and fold_t:
            shift = shift + torch.where(t != 0, t / torch.where(g != 0, g, 1.0), 0.0)
        new[writer] = (s * a, shift)
    bad = next((site for site, pair in new.items() if not all(_normal_f32(v) for v in pair)), None)
    if bad is not None:
        return spec, (f"folding it would put values beyond float32's normal range into {bad}'s "
                      f"factors, so the affine stays")
    for site, (a, b) in new.items():
        state[f"{site}.ssf_scale"], state[f"{site}.ssf_shift"] = a, b
    state.pop(w_key, None)
    if fold_t:
        state.pop(b_key, None)
        return None, (f"the per-channel affine at {path} ({spec.get('why') or 'a graph edit'}) "
                      f"into {root}'s residual stream, exactly: no extra node")
    ch = int(stuck[0])
    rest = dict(spec, kind="shift")
    rest.pop("fold", None)
    return rest, (f"its scale folded into {root}'s residual stream; its shift cannot enter the "
                  f"stream through {last}, which is 0 at channel {ch}")


def _build_base(model: nn.Module, state: dict, report: FuseReport, kept: dict) -> nn.Module:
    rec = creation_record(model)
    family = family_of(model)   # another model family (transformers) rebuilds its own class
    if family is not None or rec is not None:
        if family is not None:
            base = family.rebuild(model, rec, meta=True)
        else:
            import timm
            with torch.device("meta"):
                base = timm.create_model(rec["arch"], num_classes=rec["num_classes"],
                                         **rec["kwargs"])
        apply_edits(base, kept)   # on the meta device, like the base
        if rec is not None:
            rec = {k: v for k, v in rec.items() if k != "edits"}
            if kept:
                rec["edits"] = copy.deepcopy(kept)
            base.__dict__[CREATE_RECORD] = rec
    else:
        base = copy.deepcopy(model)
        unload(base)
    base_keys = set(base.state_dict())
    added = {name for name, _ in report.added}
    report.keys_match_base = not added and not kept and base_keys == set(state)
    for name in sorted(added):
        mod_name, _, attr = name.rpartition(".")
        mod = base.get_submodule(mod_name) if mod_name else base
        mod.register_parameter(attr, nn.Parameter(torch.empty_like(state[name], device="meta")))
    diff = key_diff(base.state_dict(), state)
    if diff.missing or diff.unexpected:
        raise FuseError(f"fused weights do not fit the base architecture: missing "
                             f"{sorted(diff.missing)[:3]}, unexpected {sorted(diff.unexpected)[:3]}")
    if diff.wrong_shape:
        k, want, got = diff.wrong_shape[0]
        raise FuseError(f"fused weight {k} has shape {got}, base expects {want}")
    base.load_state_dict(state, strict=True, assign=True)
    if rec is not None or family is not None:
        _materialise(base, model, rec)
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _meta_tensors(module: nn.Module) -> list[tuple[str, str, torch.Tensor, bool]]:
    """(module name, attribute, tensor, is buffer) for everything still on the meta device.

    After ``load_state_dict(assign=True)`` that is what the state dict does not hold: non-persistent
    buffers (Swin's ``relative_position_index`` / ``attn_mask``, rotary tables...) and the odd plain
    tensor attribute."""
    out = []
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, buf in mod._buffers.items():
            if buf is not None and buf.is_meta:
                out.append((mod_name, attr, buf, True))
        for attr, val in vars(mod).items():
            if isinstance(val, torch.Tensor) and not isinstance(val, nn.Parameter) and val.is_meta:
                out.append((mod_name, attr, val, False))
    return out


def _materialise(base: nn.Module, source: nn.Module, rec: dict) -> None:
    """Give ``base`` (built on the meta device) real values for what its state dict did not hold.

    Taken by name from ``source`` (the tuned model: same architecture, same constructor arguments,
    and the values it computes with - also after a ``.half()``) when it has a tensor of that shape
    there; otherwise from a real, CPU-built instance of the base architecture (built only if
    needed: it costs a full initialisation)."""
    pending = _meta_tensors(base)
    if not pending:
        return
    real = None
    for mod_name, attr, meta, is_buffer in pending:
        value = None
        for ref in (source, real):
            if ref is None:
                continue
            try:
                owner = ref.get_submodule(mod_name) if mod_name else ref
            except AttributeError:
                continue
            cand = owner._buffers.get(attr) if is_buffer else vars(owner).get(attr)
            if isinstance(cand, torch.Tensor) and not cand.is_meta and \
                    tuple(cand.shape) == tuple(meta.shape):
                value = cand
                break
        if value is None and real is None:
            family = family_of(source)
            if family is not None:
                real = family.rebuild(source, rec, meta=False)
            else:
                import timm
                real = timm.create_model(rec["arch"], num_classes=rec["num_classes"],
                                         **rec["kwargs"])
            apply_edits(real, (rec or {}).get("edits"))
            owner = real.get_submodule(mod_name) if mod_name else real
            value = owner._buffers.get(attr) if is_buffer else vars(owner).get(attr)
        if not isinstance(value, torch.Tensor) or value.is_meta:
            arch = (rec or {}).get("arch") or type(source).__name__
            raise FuseError(f"cannot materialise {mod_name + '.' if mod_name else ''}{attr} of the "
                            f"fused {arch}: it is not in the state dict and neither the tuned "
                            f"model nor a fresh {arch} has it")
        owner = base.get_submodule(mod_name) if mod_name else base
        value = value.detach().to("cpu", copy=True)
        if is_buffer:
            owner._buffers[attr] = value   # keeps its persistent flag: only the value was missing
        else:
            setattr(owner, attr, value)
