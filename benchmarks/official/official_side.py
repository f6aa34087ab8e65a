"""The half of the official-code record that runs the official SSF code (dongzelian/SSF).

Run by ``run.py`` with the official code's own interpreter (timm 0.6.5, as its README asks), never
imported by ssf-deploy. For every case it builds the official model exactly as the official
``train.py`` does (``timm.create_model(arch, num_classes=..., tuning_mode='ssf')`` after importing
the official ``models`` package), perturbs every tensor from a fixed seed (trained-looking values:
layer scales, norm affines, biases, SSF factors far from identity), writes the checkpoint the way
``train.py``'s ``CheckpointSaver`` does (``state_dict``, ``arch``, ``args`` as an
``argparse.Namespace``, ``epoch``, ``version``, ``metric``) and the official model's own eval-mode
logits on fixed inputs. Nothing here is ssf-deploy code, and none of the official code is copied.

    python official_side.py OFFICIAL_CHECKOUT OUT_DIR CASES_JSON
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def perturb(model, seed: int) -> None:
    """Every parameter off its init, deterministic for ``seed`` (same rule as the test suite)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("ssf_scale"):
                p.copy_(1.0 + 0.3 * r)
            elif leaf.startswith("ssf_shift"):
                p.copy_(0.3 * r)
            elif leaf == "gamma":
                p.copy_(0.1 * torch.exp(0.5 * r))
            elif leaf == "weight" and p.dim() == 1:
                p.copy_(1.0 + 0.2 * r)
            elif leaf == "bias":
                p.add_(0.1 * r)
            else:
                p.add_(0.05 * r)


def tweak(model, what: dict) -> None:
    """Edge cases on top of the perturbation: ``{"param": name, "index": i, "value": v}``."""
    import torch
    with torch.no_grad():
        for t in what:
            dict(model.named_parameters())[t["param"]].view(-1)[t["index"]] = float(t["value"])


def main() -> int:
    checkout, out_dir, cases_json = sys.argv[1:4]
    sys.path.insert(0, os.path.abspath(checkout))
    import timm
    import torch
    from models import convnext, swin_transformer, vision_transformer  # noqa: F401 (registers)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cases = json.loads(open(cases_json).read())
    os.makedirs(out_dir, exist_ok=True)
    for case in cases:
        name, arch, size, classes = case["name"], case["arch"], case["image_size"], case["classes"]
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, num_classes=classes, drop_path_rate=0.0,
                                  tuning_mode="ssf")
        perturb(model, case.get("seed", 0))
        tweak(model, case.get("tweak", []))
        model.eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(x)
        args = argparse.Namespace(model=arch, num_classes=classes, tuning_mode="ssf",
                                  img_size=size, channels_last=False, drop_path=0.0, lr=5e-3)
        ckpt = {"epoch": 99, "arch": arch, "state_dict": model.state_dict(), "args": args,
                "version": 2, "metric": 0.0}
        torch.save(ckpt, os.path.join(out_dir, f"{name}.pth"))
        torch.save({"input": x, "logits": logits, "timm": str(timm.__version__),
                    "torch": str(torch.__version__)},
                   os.path.join(out_dir, f"{name}.official.pt"))
        print(f"official {name}: {arch} at {size} px, logits {tuple(logits.shape)}", flush=True)
        del model, ckpt
    return 0


if __name__ == "__main__":
    sys.exit(main())
