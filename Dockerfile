# ssl-ebm for GPU clusters: CUDA, pinned torch and DeepSpeed, the package installed as the README says.
#
#   docker build -t ssl-ebm .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/ssl-ebm/runs ssl-ebm
#   docker run --gpus all --ipc=host ssl-ebm accelerate launch --config_file configs/accelerate/zero2.yaml \
#       --num_processes 8 launch/train.py --config configs/digits.yaml train.mixed_precision=bf16
#
# The devel image brings the compilers DeepSpeed needs to build its ops on first use. Change CUDA_IMAGE
# and TORCH_VERSION together (the torch wheel's CUDA must not be newer than the image's driver allows).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.11.0
ARG DEEPSPEED_VERSION=0.19.8

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential ninja-build git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /workspace/ssl-ebm
# Pinned first (its own layer: the largest download), then the package, as README.md installs it.
RUN pip install "torch==${TORCH_VERSION}" "deepspeed==${DEEPSPEED_VERSION}"
COPY pyproject.toml README.md ./
COPY ssl_ebm/ ssl_ebm/
COPY shards/ shards/
RUN pip install -e ".[deepspeed]"
COPY launch/ launch/
COPY configs/ configs/

# The documented entry; give another command to `docker run` for other configs and launchers.
CMD ["accelerate", "launch", "launch/train.py", "--config", "configs/digits.yaml"]
