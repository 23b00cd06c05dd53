#!/bin/bash
# benchmarks/tofu_smol_collect.sh [RUN_DIR]: copy what the smol benchmark has finished so far
# (benchmark.json/.md/.png, grid.png, each method's selected dynamics plot and log, the data
# manifest and the run's log) from RUN_DIR (default: runs/tofu_smol of the checkout) into
# benchmarks/results/tofu_smol/, to commit; each method's selected setting (configs/*.yaml)
# into the checkout's configs/tofu_smol/; and the stage caches a later session restores to
# continue (cache/: every evaluation, and each unlearning run's result.json and eval.png, as
# the benchmark stores them: `cp -r benchmarks/results/tofu_smol/cache/. runs/tofu_smol/`).
# Models stay in RUN_DIR (a later session fine-tunes the target again; the retain models'
# evaluations are cached, so they are not).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
run=${1:-$root/runs/tofu_smol}
dest=$root/benchmarks/results/tofu_smol
[ -f "$run/benchmark.json" ] || { echo "no benchmark.json in $run yet: nothing finished" >&2; exit 1; }
mkdir -p "$dest/dynamics"
for f in benchmark.json benchmark.md benchmark.png grid.png; do
    [ -f "$run/$f" ] && cp "$run/$f" "$dest/$f"
done
[ -d "$run/dynamics" ] && cp "$run"/dynamics/* "$dest/dynamics/" 2>/dev/null || true
if [ -d "$run/configs" ]; then  # the grid's selections: the recommended settings, in the checkout's configs/
    mkdir -p "$root/configs/tofu_smol" && cp "$run"/configs/*.yaml "$root/configs/tofu_smol/"
fi
[ -f "$run/data/manifest.json" ] && cp "$run/data/manifest.json" "$dest/data_manifest.json"
[ -f "$run/log.txt" ] && tail -n 400 "$run/log.txt" | grep -v 'Warning\|warn(' > "$dest/log_tail.txt" || true
(cd "$run" && find evals runs \( -path 'evals/*.json' -o -name result.json -o -name eval.png \) -type f 2>/dev/null) \
    | while read -r f; do mkdir -p "$dest/cache/$(dirname "$f")" && cp "$run/$f" "$dest/cache/$f"; done
echo "copied into $dest: $(ls "$dest" | tr '\n' ' ')"
