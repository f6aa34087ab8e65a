"""What the trust checks cost on ViT-B/16: base hash (at training and at every load) and the
golden probe (recorded with every checkpoint, replayed by fuse/verify/refit).

    python benchmarks/trust_overhead.py [--model vit_base_patch16_224] [--repeat 5]

Each figure is the median of --repeat runs, timed two ways: the library's own timer
(``check_base`` reports its seconds) and a plain ``time.perf_counter`` around the call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args()

    import ssf_deploy as sd
    from ssf_deploy.formats.provenance import base_record, check_base, record_probe
    from ssf_deploy.models import input_size

    model = sd.create_base_model(args.model, args.num_classes, init_seed=0)
    sd.apply_method(model, "ssf")
    state = sd.trainable_state_dict(model)
    size = input_size(model)[1]
    rec = base_record(model, state, arch=args.model, num_classes=args.num_classes,
                      model_kwargs={}, image_size=size, source="random-init", init_seed=0)
    frozen_bytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                       if k not in state)

    lib, plain, probe = [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = check_base(model, state, rec)
        plain.append(time.perf_counter() - t0)
        lib.append(out["seconds"])
        assert out["status"] == "verified"
        t0 = time.perf_counter()
        record_probe(model, size)
        probe.append(time.perf_counter() - t0)
    result = {
        "model": args.model, "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "base_tensors": rec["tensors"],
        "base_megabytes": round(frozen_bytes / 1e6, 1),
        "hash_seconds_library_timer": round(statistics.median(lib), 3),
        "hash_seconds_plain_timer": round(statistics.median(plain), 3),
        "hash_gigabytes_per_second": round(frozen_bytes / 1e9 / statistics.median(plain), 2),
        "probe_seconds": round(statistics.median(probe), 3), "repeat": args.repeat,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        from ssf_deploy.fileio import write_json
        write_json(result, args.out)


if __name__ == "__main__":
    main()
