#!/usr/bin/env bash
# Installs the CUDA compiler and the headers torch's CUDA headers include, inside a manylinux_2_28
# (AlmaLinux 8) container, from NVIDIA's package repository. Argument: the CUDA version as NVIDIA's
# packages spell it (13-0 for CUDA 13.0); it must match the CUDA version of the torch built against.
set -euo pipefail
V=${1:-13-0}
dnf install -y -q dnf-plugins-core
dnf config-manager --add-repo https://developer.download.nvidia.com/compute/cuda/repos/rhel8/x86_64/cuda-rhel8.repo
dnf install -y -q "cuda-nvcc-$V" "cuda-cudart-devel-$V" "cuda-nvrtc-devel-$V" "cuda-nvtx-$V" "cuda-cccl-$V" \
  "libcublas-devel-$V" "libcusparse-devel-$V" "libcusolver-devel-$V" "libcurand-devel-$V" "libcufft-devel-$V"
ln -sfn "/usr/local/cuda-${V/-/.}" /usr/local/cuda
/usr/local/cuda/bin/nvcc --version
