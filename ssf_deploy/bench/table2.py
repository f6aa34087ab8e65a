"""Paper Table 2: the extra parameters and FLOPs of each method's inference model over the
base, measured, next to the paper's formulas."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .rows import BenchConfig, create_model

__all__ = ["vit_geometry", "table2_formulas", "table2"]


def vit_geometry(cfg: BenchConfig) -> Optional[dict]:
    """L, d, tokens and the per-block SSF channel count of a ViT-like base (None otherwise)."""
    from ..models import head_modules
    with torch.device("meta"):
        model = create_model(cfg)
    blocks = getattr(model, "blocks", None)
    embed = getattr(model, "patch_embed", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or embed is None \
            or getattr(embed, "num_patches", None) is None:
        return None
    d = int(getattr(model, "embed_dim", None) or model.num_features)
    tokens = int(embed.num_patches) + int(getattr(model, "num_prefix_tokens", 0))

    def channels(mod: nn.Module) -> int:   # outputs of the ops with a linear coefficient
        c = 0
        for m in mod.modules():
            if isinstance(m, nn.Linear):
                c += m.out_features
            elif isinstance(m, nn.modules.conv._ConvNd):
                c += m.out_channels
            elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
                c += m.normalized_shape[0]
        return c

    per_block = [channels(b) for b in blocks]
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    in_head = {id(m) for h in head_modules(model) for m in h.modules()}
    outside = 0
    for m in model.modules():
        if id(m) in in_blocks or id(m) in in_head or m is model:
            continue
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm)):
            outside += _own_channels(m)
    block_macs = sum(m.in_features * m.out_features for m in blocks[0].modules()
                     if isinstance(m, nn.Linear))
    return {"L": len(blocks), "d": d, "tokens": tokens, "m": 2 * per_block[0] / d,
            "ssf_block_params": 2 * sum(per_block), "ssf_outside_params": 2 * outside,
            "block_linear_macs_per_token": block_macs}


def _own_channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return m.normalized_shape[0]
    return 0


def table2_formulas(cfg: BenchConfig, geo: dict) -> dict:
    """Paper Table 2 with N^2 = tokens (class token included), in FLOPs as measured here.

    The paper's Adapter and VPT terms count multiply-adds (2Ldd' params do 2N^2Ldd' of them), so
    they are doubled; its SSF term mN^2Ld counts one op per scale or shift value and token, which
    is already one FLOP each. ``params_exact`` adds what the leading terms leave out: Adapter
    biases and the SSF sites outside the blocks (patch embedding, final norm).
    """
    L, d, T, m = geo["L"], geo["d"], geo["tokens"], geo["m"]
    dd = int(cfg.adapter_dim or 12)
    n_sh = int(cfg.prompts or 200)
    n_dp = int(cfg.prompts or 50)
    return {
        "adapter": {"symbols": f"L={L} d={d} d'={dd} N^2={T}",
                    "params_text": "2Ldd'", "flops_text": "2N^2Ldd' MACs",
                    "params": 2 * L * d * dd, "params_exact": L * (2 * d * dd + d + dd),
                    "flops": 2 * (2 * T * L * d * dd)},
        "vpt-shallow": {"symbols": f"n={n_sh} d={d} N^2={T}",
                        "params_text": "nd", "flops_text": "2n(2N^2+n)d MACs",
                        "params": n_sh * d, "params_exact": n_sh * d,
                        "flops": 2 * (2 * n_sh * (2 * T + n_sh) * d)},
        "vpt-deep": {"symbols": f"n={n_dp} L={L} d={d} N^2={T}",
                     "params_text": "nLd", "flops_text": "2n(2N^2+n)Ld MACs",
                     "params": n_dp * L * d, "params_exact": n_dp * L * d,
                     "flops": 2 * (2 * n_dp * (2 * T + n_dp) * L * d)},
        "ssf": {"symbols": f"m={m:g} L={L} d={d} N^2={T}",
                "params_text": "mLd", "flops_text": "mN^2Ld ops",
                "params": round(m * L * d),
                "params_exact": geo["ssf_block_params"] + geo["ssf_outside_params"],
                "flops": round(m * T * L * d)},
        "ssf-fused": {"symbols": "re-parameterised", "params_text": "0", "flops_text": "0",
                      "params": 0, "params_exact": 0, "flops": 0},
    }


def table2(cfg: BenchConfig, results: dict) -> Optional[dict]:
    """Measured extra params/FLOPs of the inference model over base vs the paper's formulas."""
    geo = vit_geometry(cfg)
    if geo is None or "base" not in results:
        return None
    base = results["base"]
    rows = []
    for method, f in table2_formulas(cfg, geo).items():
        if method not in results:
            continue
        r = results[method]
        extra_p = r["inference_params"] - base["inference_params"]
        extra_f = r["inference_flops"] - base["inference_flops"]
        rows.append({
            "method": method, "symbols": f["symbols"],
            "params_formula_text": f["params_text"], "flops_formula_text": f["flops_text"],
            "extra_params": extra_p, "extra_params_formula": f["params"],
            "extra_params_exact": f["params_exact"],
            "extra_params_pct_of_base": 100.0 * extra_p / base["inference_params"],
            "extra_flops": extra_f, "extra_flops_formula": f["flops"],
            "extra_flops_pct_of_base": 100.0 * extra_f / base["inference_flops"],
            "flops_measured_over_formula": (extra_f / f["flops"]) if f["flops"] else None,
        })
    return {"geometry": geo, "rows": rows,
            "note": "per image; Adapter/VPT formulas are multiply-adds (x2 = FLOPs). The paper's "
                    "VPT terms count only the attention products, not the prompts' pass through "
                    "qkv/proj/MLP, and VPT-shallow's prompts also pass all L blocks"}
