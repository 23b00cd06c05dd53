#!/bin/bash
# benchmarks/tofu_smol_collect.sh [RUN_DIR]: copy what the smol benchmark has finished so far
# (benchmark.json/.md/.png, grid.png, each method's selected dynamics plot and log, the data
# manifest and the run's log) from RUN_DIR (default: runs/tofu_smol of the checkout) into
# benchmarks/results/tofu_smol/, to commit. Models, per-run directories and evaluations stay in RUN_DIR.
set -euo pipefail
run=${1:-$(cd "$(dirname "$0")/.." && pwd)/runs/tofu_smol}
dest=$(cd "$(dirname "$0")" && pwd)/results/tofu_smol
[ -f "$run/benchmark.json" ] || { echo "no benchmark.json in $run yet: nothing finished" >&2; exit 1; }
mkdir -p "$dest/dynamics"
for f in benchmark.json benchmark.md benchmark.png grid.png; do
    [ -f "$run/$f" ] && cp "$run/$f" "$dest/$f"
done
[ -d "$run/dynamics" ] && cp "$run"/dynamics/* "$dest/dynamics/" 2>/dev/null || true
[ -f "$run/data/manifest.json" ] && cp "$run/data/manifest.json" "$dest/data_manifest.json"
[ -f "$run/log.txt" ] && tail -n 400 "$run/log.txt" | grep -v 'Warning\|warn(' > "$dest/log_tail.txt" || true
echo "copied into $dest: $(ls "$dest" | tr '\n' ' ')"
