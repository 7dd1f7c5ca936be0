#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and torch already installed (no registry needed): builds medfast
# for the local GPU, runs the whole test suite (CUDA tests included) and compute-sanitizer over
# every kernel, then the GPU benchmark suites (`medfast bench --device cuda`, skip with
# MEDFAST_GPU_BENCH=0; MEDFAST_GPU_BENCH=quick for the quick sizes). Results go to ${OUT:-out/gpu}
# (the benchmark reports to $OUT/bench). Extra wheels (test dependencies) may sit in .whl/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export MEDFAST_CUDA=1
$PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
$PY -m medfast info | tee "$OUT/info.txt"
$PY -m pytest -q -p no:cacheprovider tests -rs 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/cuda_sanitize.py > "$OUT/sanitizer.log" 2>&1
  echo "compute-sanitizer memcheck rc=$?"; tail -3 "$OUT/sanitizer.log"
fi
case "${MEDFAST_GPU_BENCH:-full}" in
  0) ;;
  quick) $PY -m medfast bench --device cuda --quick --out "$OUT/bench" 2>&1 | tail -40 ;;
  *) $PY -m medfast bench --device cuda --out "$OUT/bench" 2>&1 | tail -40 ;;
esac
exit $rc
