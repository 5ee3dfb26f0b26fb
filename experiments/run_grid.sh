#!/usr/bin/env bash
# Sequential real-model runs behind BENCHMARKS.md. Usage: experiments/run_grid.sh OUT_ROOT "RUN..."
# Each RUN is "name|dfo-lora tune options"; finished runs (results.json present) are skipped.
set -u
root=$1; shift
for spec in "$@"; do
  name=${spec%%|*}; opts=${spec#*|}
  [ -f "$root/$name/results.json" ] && continue
  .venv/bin/dfo-lora tune $opts --out "$root/$name" --overwrite --quiet > "$root/$name.log" 2>&1
  tail -3 "$root/$name.log"
done
