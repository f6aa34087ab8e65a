#!/usr/bin/env bash
# fuse + verify + export of ViT-B/16 from a checkpoint, timed two ways: `ssf-deploy fuse`'s own
# per-stage report and the wall clock around the whole command (imports included).
#   bash benchmarks/fuse_speed.sh [WORKDIR]     (target: <= 20 s on a 2-core CPU, warm cache)
set -euo pipefail
work=${1:-$(mktemp -d)}
mkdir -p "$work"
export XDG_CACHE_HOME="$work/cache"          # a cold graph-stats cache for the first run
python - "$work" <<'PY'
import sys, ssf_deploy as sd
m = sd.create_base_model("vit_base_patch16_224", 100, init_seed=0)
sd.apply_method(m, "ssf", init_std=0.3)
sd.save_task(m, f"{sys.argv[1]}/vitb.pt")
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in cold warm never; do
  extra=""; [ "$run" = never ] && extra="--compare-graph never"
  start=$(date +%s.%N)
  ssf-deploy fuse "$work/vitb.pt" --out "$work/vitb.onnx" --json $extra > "$work/$run.json"
  end=$(date +%s.%N)
  python - "$work/$run.json" "$run" "$start" "$end" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
wall = float(sys.argv[4]) - float(sys.argv[3])
stages = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
print(f"{sys.argv[2]:>5}: wall {wall:.1f} s (stages: {stages}; sum {sum(r['seconds'].values()):.1f} s)"
      f" passed={r['passed']} nodes={r['onnx']['fused']['nodes']}")
PY
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
