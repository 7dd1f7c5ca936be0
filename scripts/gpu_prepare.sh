#!/usr/bin/env bash
# Prepares, on this machine, what a lent GPU machine (no registry; Python 3.12, torch preinstalled) needs
# for scripts/gpu_check.sh: the test/benchmark peers as Python 3.12 wheels in .whl/ and the files of the
# Debian data packages in .devdata/ (both git-ignored). Then send them along with the check:
#   device run, carry [".whl", ".devdata"]:
#   MEDFAST_GPU_BUDGET=500 MEDFAST_GPU_PACK=1 bash scripts/gpu_check.sh
# (about 150 s of it is the build; results come back as $OUT/gpu_results.tgz).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo '/.devdata/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  monai==1.6.1 nibabel==5.4.2 nilearn==0.14.1 torch-interpol==0.3.0 pymust==0.1.9 pydicom==3.0.2
mkdir -p .devdata/mricron .devdata/itk
[ -d /usr/share/mricron/templates ] && cp -r /usr/share/mricron/templates .devdata/mricron/
[ -d /usr/share/doc/insighttoolkit5-examples/examples/Data ] &&
  cp -r /usr/share/doc/insighttoolkit5-examples/examples/Data .devdata/itk/
du -sh .whl .devdata
