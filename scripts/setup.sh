#!/usr/bin/env bash
# Creates (or reuses) the local virtual environment .venv, installs torch and every build, test,
# demo and benchmark dependency, and builds medfast into it (editable, persistent build folder).
# Sourced by scripts/test.sh and scripts/demo.sh (scripts/wheel_check.sh needs the .venv it makes);
# safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${MEDFAST_TORCH:-torch==2.14.1}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC" numpy "scikit-build-core>=1.1" ninja "cmake>=3.24"
python -m pip install -q -r requirements-dev.txt
bash scripts/data.sh

# CUDA kernels are compiled whenever a CUDA toolkit is found (MEDFAST_CUDA=0 turns them off).
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-13.0; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME=$d; break; fi
  done
fi
if [ -n "${CUDA_HOME:-}" ] && [ -z "${CUDACXX:-}" ]; then export CUDACXX=$CUDA_HOME/bin/nvcc; fi
# Without a visible GPU, one architecture proves the CUDA code compiles (release wheels use more).
if [ -z "${MEDFAST_CUDA_ARCHS:-}" ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  export MEDFAST_CUDA_ARCHS=90
fi
echo "medfast setup: building (CUDA_HOME=${CUDA_HOME:-none}, archs=${MEDFAST_CUDA_ARCHS:-${TORCH_CUDA_ARCH_LIST:-native}})"
python -m pip install -q --no-build-isolation --no-deps -e . 
python -m medfast info
