#!/usr/bin/env bash
# GPU acceptance in one command: the step's speed with repeats and a profiled breakdown, end to end through
# the input pipeline, and a time-boxed CIFAR-10 run of ours and of the supervised-only twin; one JSON of figures.
#   launch/gpu_check.sh --source cifar-10-python.tar.gz   # on the GPU machine; installs ../shared/wheels if present
#   launch/gpu_check.sh --cpu-smoke --source TINY_CIFAR --out smoke.json
# Arguments go to launch/gpu_check.py (--out, --wheels, --shards, --source, --train-minutes, --parts, --work;
# see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
if [[ " $* " != *" --wheels "* && " $* " != *" --cpu-smoke "* ]] && ! python3 -c "import deepspeed, webdataset" 2>/dev/null \
    && [[ -d ../shared/wheels ]]; then
  args+=(--wheels ../shared/wheels)  # the offline GPU machine lacks deepspeed / webdataset / datasets
fi
exec python3 launch/gpu_check.py "${args[@]}"
