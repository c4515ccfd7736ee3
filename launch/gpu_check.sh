#!/usr/bin/env bash
# GPU readiness in one command: speed benchmark (captured vs eager sampler), a short bf16 run of
# configs/cifar10_jpeg.yaml, a 200-step ZeRO-2 run with a WRN-28-10 encoder; one JSON of figures.
#   launch/gpu_check.sh                       # on the GPU machine; installs ../shared/wheels if present
#   launch/gpu_check.sh --cpu-smoke --out smoke.json
# Arguments go to launch/gpu_check.py (--out, --wheels, --shards, --parts, --work; see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
if [[ " $* " != *" --wheels "* && " $* " != *" --cpu-smoke "* ]] && ! python3 -c "import deepspeed, webdataset" 2>/dev/null \
    && [[ -d ../shared/wheels ]]; then
  args+=(--wheels ../shared/wheels)  # the offline GPU machine lacks deepspeed / webdataset / datasets
fi
exec python3 launch/gpu_check.py "${args[@]}"
