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
    # The same torch release as pyproject.toml's before-build, from the CPU-only index, for the build and
    # for the test environment alike.
    TORCH_CPU="pip install --index-url https://download.pytorch.org/whl/cpu 'torch==2.14.1'"
    export CIBW_BEFORE_ALL="true"
    export CIBW_BEFORE_BUILD="$TORCH_CPU && pip install numpy 'scikit-build-core>=1.1' ninja 'cmake>=3.24'"
    # The local label names the variant, as torch's CPU wheels ("0.1.0+cpu"; build_support/torch_pin.py).
    export CIBW_ENVIRONMENT="MEDFAST_CUDA=0 MEDFAST_LOCAL_VERSION=cpu"
    # Before the wheel is installed into the test environment: its torch==2.14.* requirement is then already
    # met by the CPU torch (otherwise pip fetches the CUDA build from PyPI first, gigabytes, to replace it).
    export CIBW_BEFORE_TEST="$TORCH_CPU"
    export CIBW_TEST_COMMAND="cd /tmp && python {project}/scripts/wheel_smoke.py"
    ;;
  *) echo "usage: $0 cuda|cpu" >&2; exit 2 ;;
esac
python3 -m cibuildwheel --platform linux --output-dir "wheelhouse/$VARIANT" .
