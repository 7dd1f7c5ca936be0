#!/usr/bin/env bash
# Release wheels for GPU clusters with cibuildwheel (manylinux_2_28 x86_64, CPython 3.10-3.13).
#   bash scripts/build_wheels.sh cuda   # CUDA kernels for sm_80/86/89/90/100/120 + PTX for 12.0
#   bash scripts/build_wheels.sh cpu    # CPU-only kernels, against torch's CPU wheel
# Needs docker (or podman) and network access to PyPI, download.pytorch.org and, for the CUDA wheel,
# NVIDIA's package repository. Wheels land in wheelhouse/<variant>/. Each wheel requires the torch
# minor release it was built against (torch==2.14.*, set in pyproject.toml's before-build);
# change that pin and the CUDA version together to build for another torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VARIANT=${1:-cuda}
python3 -m pip install -q "cibuildwheel>=3"
case "$VARIANT" in
  cuda) ;;  # the defaults of [tool.cibuildwheel]
  cpu)
    export CIBW_BEFORE_ALL="true"
    export CIBW_BEFORE_BUILD="pip install --index-url https://download.pytorch.org/whl/cpu 'torch==2.14.1' && pip install numpy 'scikit-build-core>=1.1' ninja 'cmake>=3.24'"
    export CIBW_ENVIRONMENT="MEDFAST_CUDA=0"
    export CIBW_TEST_COMMAND="pip install --index-url https://download.pytorch.org/whl/cpu 'torch==2.14.1' && cd /tmp && python {project}/scripts/wheel_smoke.py"
    ;;
  *) echo "usage: $0 cuda|cpu" >&2; exit 2 ;;
esac
python3 -m cibuildwheel --platform linux --output-dir "wheelhouse/$VARIANT" .
