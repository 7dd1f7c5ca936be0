#!/usr/bin/env bash
# The main job on real data: warps the MNI152 T1 template (shipped in the nilearn wheel) by a
# random smooth deformation, writes NIfTI + PNG to out/demo, and prints the speed against the
# grid_sample route. Sets everything up first (scripts/setup.sh). Extra args go to `medfast demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
medfast demo --out out/demo "$@"
