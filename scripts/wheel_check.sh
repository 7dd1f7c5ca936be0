#!/usr/bin/env bash
# Builds the CPU-only wheel and the sdist with `python -m build` (in the venv of scripts/setup.sh, whose
# torch the wheel is compiled against and pinned to), installs the wheel into a FRESH virtual
# environment with that torch, and runs scripts/wheel_smoke.py there, outside the source tree.
# Usage: bash scripts/wheel_check.sh [dist-dir]   (default: dist/)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIST=${1:-dist}
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_VERSION=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
echo "wheel check: building sdist + CPU wheel against torch $TORCH_VERSION"
rm -rf "$DIST" && mkdir -p "$DIST"
# Its own build folder, so the editable development build (CUDA on) is left as it is.
# The sdist without a local label, the CPU wheel with one (+cpu; scikit-build-core wants one version per build)
.venv/bin/python -m build --no-isolation --sdist -o "$DIST" . > "$DIST/build.log" 2>&1 \
  || { tail -40 "$DIST/build.log"; exit 1; }
MEDFAST_CUDA=0 MEDFAST_LOCAL_VERSION=cpu .venv/bin/python -m build --no-isolation --wheel -o "$DIST" \
  -C build-dir=build/wheel-cpu . >> "$DIST/build.log" 2>&1 || { tail -40 "$DIST/build.log"; exit 1; }
WHEEL=$(ls "$DIST"/medfast-*.whl)
case "$WHEEL" in *+cpu-*) ;; *) echo "the CPU wheel's name lacks its +cpu label: $WHEEL" >&2; exit 1 ;; esac
echo "built $(ls "$DIST" | grep -v build.log | tr '\n' ' ')"
unzip -p "$WHEEL" '*.dist-info/METADATA' | grep -E "^Requires-Dist: (torch|numpy)"
VENV=${MEDFAST_WHEEL_VENV:-/tmp/medfast-wheel-venv}
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "$WHEEL" 2>&1 | { grep -v "^WARNING: Location" || true; }
(cd /tmp && "$VENV/bin/python" "$OLDPWD/scripts/wheel_smoke.py")
(cd /tmp && "$VENV/bin/medfast" info)
(cd /tmp && "$VENV/bin/python" -c "import medfast; assert medfast.__version__.endswith('+cpu'), medfast.__version__")
