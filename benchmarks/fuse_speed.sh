#!/usr/bin/env bash
# `ssf-deploy fuse` (fold + verify + export + checks) of a ViT-B/16 SSF checkpoint against a plain
# `ssf-deploy export` of the same base, side by side in one run.
#   bash benchmarks/fuse_speed.sh [WORKDIR] [ROUNDS=3] [TREE...]   (target: first fuse <= 1.5x export)
# Every round runs, interleaved: export (A), the first fuse with an empty graph-stats cache (B),
# a second fuse (C); with TREEs (source checkouts, e.g. before and after a change) it runs A B C
# for each tree in turn, every round, so a shared machine's load falls on all of them alike.
# Each command is timed twice, independently: this script's own wall clock (date, around the
# command) and /usr/bin/time's elapsed time; fuse also reports its per-stage seconds (its JSON).
# Medians over the rounds and the ratios B/A and C/A (each tree against its own export).
set -euo pipefail
work=${1:-$(mktemp -d)}
rounds=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
trees=("$@")
[ ${#trees[@]} -eq 0 ] && trees=("")          # "": the installed package
mkdir -p "$work"
[ -f "$work/vitb.pt" ] || python - "$work" <<'PY'
import sys, ssf_deploy as sd
from ssf_deploy.fileio import save_safetensors
w = sys.argv[1]
base = sd.create_base_model("vit_base_patch16_224", 100, init_seed=0)
save_safetensors(base.state_dict(), f"{w}/base.safetensors")      # the base both commands use
m = sd.create_base_model("vit_base_patch16_224", 100, pretrained_file=f"{w}/base.safetensors")
sd.apply_method(m, "ssf", init_std=0.3)
sd.save_task(m, f"{w}/vitb.pt")
PY
: > "$work/times.txt"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  for t in "${!trees[@]}"; do
    tree=${trees[$t]}
    for run in export first second; do
      case $run in
        export) cmd=(python -m ssf_deploy export --model vit_base_patch16_224 --num-classes 100
                     --base-weights "$work/base.safetensors" --out "$work/base.onnx" --json) ;;
        first)  rm -rf "$work/cache"
                cmd=(python -m ssf_deploy fuse "$work/vitb.pt" --base-weights
                     "$work/base.safetensors" --out "$work/vitb.onnx" --json) ;;
        second) cmd=(python -m ssf_deploy fuse "$work/vitb.pt" --base-weights
                     "$work/base.safetensors" --out "$work/vitb.onnx" --json) ;;
      esac
      start=$(date +%s.%N)
      PYTHONPATH="${tree}${PYTHONPATH:+:$PYTHONPATH}" XDG_CACHE_HOME="$work/cache" \
        /usr/bin/time -f "%e" -o "$work/time" "${cmd[@]}" > "$work/$run.$t.$r.json"
      end=$(date +%s.%N)
      echo "$t $run $r $start $end $(cat "$work/time")" >> "$work/times.txt"
      echo "  round $r ${tree:-installed} $run: $(python -c "print(f'{$end - $start:.1f}')") s" >&2
    done
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python - "$work" "${trees[@]:-installed}" <<'PY'
import json, statistics, sys
w, trees = sys.argv[1], sys.argv[2:] or ["installed"]
rows = [ln.split() for ln in open(f"{w}/times.txt")]
for t, tree in enumerate(trees):
    mine = [r for r in rows if r[0] == str(t)]
    wall = {run: [float(e) - float(s) for _, r, i, s, e, g in mine if r == run]
            for run in ("export", "first", "second")}
    gnu = {run: [float(g) for _, r, i, s, e, g in mine if r == run]
           for run in ("export", "first", "second")}
    med = {k: statistics.median(v) for k, v in wall.items()}
    gmed = {k: statistics.median(v) for k, v in gnu.items()}
    print(f"== {tree or 'installed'}")
    print(f"{'command':<8} {'script wall: median (all)':<36} {'/usr/bin/time: median (all)'}")
    for run in ("export", "first", "second"):
        print(f"{run:<8} {med[run]:6.1f} s ({' '.join(f'{x:.1f}' for x in wall[run])})"
              f"{'':<8} {gmed[run]:6.1f} s ({' '.join(f'{x:.1f}' for x in gnu[run])})")
    for run in ("first", "second"):
        print(f"{run} fuse / export: {med[run] / med['export']:.2f}x (script wall), "
              f"{gmed[run] / gmed['export']:.2f}x (/usr/bin/time); per round "
              + " ".join(f"{a / b:.2f}" for a, b in zip(wall[run], wall["export"])))
    for run in ("first", "second"):
        r = json.load(open(f"{w}/{run}.{t}.{len(wall[run])}.json"))
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
        print(f"{run} fuse stages (last round): {stages}; sum {sum(r['seconds'].values()):.1f} s;"
              f" passed={r['passed']} nodes={r['onnx']['fused']['nodes']}")
PY
