#!/usr/bin/env bash
# The peer engines' environment for compare.py (--engines ...,openvino,onnxruntime):
# benchmarks/.venv-peers, git-ignored. optimum-intel and optimum-onnx need transformers 4.x
# and an older diffusers, latentkit's environment has transformers 5: hence a venv of their
# own, which compare.py runs its peer workers with (--peer-python).
#
# The versions are the ones pip resolved for these packages on 2026-12-07 and the smoke test
# ran with (benchmarks/README.md). optimum-intel 2.x wants transformers 5 but optimum-onnx
# 0.1.0 wants transformers < 4.58, so pip settles on optimum-intel 1.27.0 for both.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv-peers
.venv-peers/bin/python -m pip install --upgrade pip
# torch first, pinned: 2.13.0 is a local CPU wheel here. Unpinned (or left for optimum to
# pull in) it is several GB of CUDA packages.
.venv-peers/bin/python -m pip install torch==2.13.0
.venv-peers/bin/python -m pip install \
    "optimum-intel[openvino]==1.27.0" \
    "optimum-onnx[onnxruntime]==0.1.0" \
    optimum==2.1.0 \
    openvino==2026.4.1 \
    nncf==3.4.0 \
    onnx==1.23.2 \
    onnxruntime==1.32.0 \
    transformers==4.57.6 \
    diffusers==0.39.0 \
    huggingface_hub==0.36.2 \
    tokenizers==0.22.2 \
    torch==2.13.0
.venv-peers/bin/python -m pip check
.venv-peers/bin/python peers.py versions
