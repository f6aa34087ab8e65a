"""Method options shared by every tool that builds a tuned model (params, train, bench)."""
from __future__ import annotations

import click

from ..tuners import METHODS

_OPTIONS = [
    click.option("--prompts", type=int, default=None,
                 help="VPT prompt tokens (default: 200 shallow, 50 deep, as in Table 5)."),
    click.option("--adapter-dim", type=int, default=None, help="Adapter bottleneck width d' (12)."),
    click.option("--ssf-blocks", type=int, default=None,
                 help="SSF only in the first N blocks (Table 6a)."),
    click.option("--ssf-exclude", default=None,
                 help="Comma list of roles without SSF: embed,attn,mlp,norm,final (Table 6b)."),
    click.option("--ssf-only", default=None, help="Comma list of roles that keep SSF (e.g. norm)."),
    click.option("--ssf-no-scale", is_flag=True, default=False, help="Shift only (Table 6d)."),
    click.option("--ssf-no-shift", is_flag=True, default=False, help="Scale only (Table 6d)."),
    click.option("--ssf-scalar-scale", is_flag=True, default=False,
                 help="One scale per site (Table 6d)."),
    click.option("--ssf-init", default=None,
                 type=click.Choice(["normal", "trunc_normal", "uniform", "constant", "random"]),
                 help="Factor initialisation (Table 6c, default normal)."),
    click.option("--ssf-impl", default=None, type=click.Choice(["lean", "naive"]),
                 help="SSF autograd: lean (default, saves memory) or naive (x*scale+shift)."),
]


def method_options(f):
    for opt in reversed(_OPTIONS):
        f = opt(f)
    return f


def _csv(v):
    return tuple(x.strip() for x in v.split(",") if x.strip()) if v else None


def parse_method_options(method: str, raw: dict) -> dict:
    """Keep only the options that belong to ``method``; unset ones take the method's defaults."""
    if method in ("vpt-shallow", "vpt-deep"):
        opts = {"prompts": raw.get("prompts")}
    elif method == "adapter":
        opts = {"dim": raw.get("adapter_dim")}
    elif method == "ssf":
        opts = {"blocks": raw.get("ssf_blocks"), "exclude": _csv(raw.get("ssf_exclude")),
                "only": _csv(raw.get("ssf_only")), "init": raw.get("ssf_init"),
                "impl": raw.get("ssf_impl")}
        if raw.get("ssf_no_scale"):
            opts["scale"] = False
        if raw.get("ssf_no_shift"):
            opts["shift"] = False
        if raw.get("ssf_scalar_scale"):
            opts["scalar_scale"] = True
    else:
        opts = {}
    return {k: v for k, v in opts.items() if v is not None}


__all__ = ["METHODS", "method_options", "parse_method_options"]
