#!/usr/bin/env bash
# The synthetic speed benchmark (issue 12) on one GPU, in a few minutes, as one JSON file.
#
#   experiments/gpu_bench.sh [OUT.json]                      # default gpu_bench.json, cuda
#   DEVICE=cpu SHAPES="tiny-llama" experiments/gpu_bench.sh out.json     # the same on a CPU
#
# For each shape (default: roberta-large gpt2-large gpt2-xl llama-1b smollm2-135m) it runs
# `dfo-lora bench --synthetic SHAPE --json` (random weights and token ids: no weights,
# tokenizer or download) and gathers the results, with the machine, into OUT.json.
#
# Needs only this repository and what a CUDA PyTorch machine has: torch, transformers,
# numpy, pyyaml, safetensors, tqdm, and peft for the gradient-LoRA step's memory (left
# null without it). One more wheel: pycma (pure Python), which the config check imports:
#   pip install cma==4.5.0     # or, offline: pip download cma==4.5.0 -d .whl, carry .whl,
#                              # and set WHEELS=.whl (installed into a temporary folder)
# Environment: DEVICE (cuda), SHAPES, PYTHON (python3), SHAPE_TIMEOUT (s per shape, 240),
# WHEELS (a folder of wheels to install first), BENCH_ARGS (extra `bench` options),
# COMPILE_SHAPES (shapes run a second time with `--compile`, the layers' norms and MLP
# compiled, BENCHMARKS.md "Fusing the per-token work"; default none, as each adds about
# a minute: COMPILE_SHAPES=roberta-large measures it on the issue's target shape),
# GRAPH_SHAPES (shapes run a second time with `--cuda-graphs`, the layers above the
# searched one replayed from captured CUDA graphs, dfo_lora/server/graphs.py; default on
# cuda: roberta-large gpt2-xl llama-1b, issue 24's shapes; elsewhere none, as it needs CUDA).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-gpu_bench.json}
device=${DEVICE:-cuda}
shapes=${SHAPES:-roberta-large gpt2-large gpt2-xl llama-1b smollm2-135m}
python=${PYTHON:-python3}
if [[ -n "${WHEELS:-}" ]]; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
lines=$(mktemp)
bench() {  # SHAPE [more bench options]
  local shape=$1
  shift
  echo "== $shape ($device) $*" >&2
  # shellcheck disable=SC2086
  if ! timeout "${SHAPE_TIMEOUT:-240}" "$python" -m dfo_lora.cli bench --synthetic "$shape" \
      --device "$device" --json ${BENCH_ARGS:-} "$@" >>"$lines"; then
    echo "{\"model\": \"synthetic:$shape\", \"error\": \"failed or timed out (stderr above)\"}" >>"$lines"
  fi
}
for shape in $shapes; do
  bench "$shape"
done
for shape in ${COMPILE_SHAPES:-}; do
  bench "$shape" --compile
done
default_graphs=""
[[ $device == cuda* ]] && default_graphs="roberta-large gpt2-xl llama-1b"
for shape in ${GRAPH_SHAPES-$default_graphs}; do
  bench "$shape" --cuda-graphs
done
"$python" - "$lines" "$out" <<'EOF'
import json, platform, sys

import torch

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
machine = {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
with open(sys.argv[2], "w") as f:
    json.dump({"machine": machine, "results": rows}, f, indent=1, sort_keys=True)
for r in rows:
    if "error" in r:
        print(f"{r['model']:34s} {r['error']}")
    else:
        name = r["model"] + (" --compile" if r.get("compile") else "")
        name += " --cuda-graphs" if r.get("cuda_graphs") else ""
        print(
            f"{name:34s} {r['evals_per_s']:9.1f} evals/s  x{r['speedup']:5.1f} naive  "
            f"{100 * r['peak_fraction']:4.0f}% of {r['dtype']} peak  "
            f"8000 evals in {r['projected_8000_evals_s']:6.1f} s"
        )
EOF
