#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU and torch already installed (no
# registry needed): builds medfast for the local GPU, runs the CUDA tests, compute-sanitizer over
# every kernel family (scripts/cuda_sanitize.py), the GPU benchmark suites (`medfast bench --device
# cuda`, one suite at a time), the warp kernel profile and the training checks (AMP, NCCL).
# Results go to ${OUT:-out/gpu}: one log per step, steps.log with each step's exit code and time,
# the benchmark reports under bench/. Knobs:
#   MEDFAST_GPU_BUDGET=SECONDS  stop starting steps when that much wall time has gone (each step is
#                               also capped to what is left), so a limited lease still returns logs
#   MEDFAST_GPU_TESTS=all|cuda|none  the whole suite, the files with CUDA tests (default), or none
#   MEDFAST_GPU_BENCH=full|quick|0   benchmark sizes (default full); MEDFAST_GPU_SUITES="warp loss ..."
#                               in that order ("sanitizer" among them places the memcheck run; else last)
#   MEDFAST_GPU_SANITIZE="loss lncc ..."  the families scripts/cuda_sanitize.py runs (default all)
#   MEDFAST_GPU_TRAIN_CHECKS="seg_none cls_sim ..."  the checks of scripts/gpu_train_check.py (default all)
#   "demo_register" / "demo_seg" in MEDFAST_GPU_SUITES run the full-resolution real-brain demos there
#                               (Colin27 -> MNI152 at 1 mm; seg_demo_gpu.yaml for MEDFAST_GPU_SEG_STEPS
#                               steps, default 300), each capped by MEDFAST_GPU_DEMO_CAP (default 150 s)
#   MEDFAST_GPU_TEST_CAP / MEDFAST_GPU_BENCH_CAP / MEDFAST_GPU_SANITIZE_CAP  per-step caps in seconds
#   MEDFAST_GPU_PROBES=0 skips the exception probes; MEDFAST_GPU_PROFILES="warp kernel" picks the profiles
#   MEDFAST_GPU_PACK=1          also pack everything into $OUT/gpu_results.tgz after each step and
#                               every 15 s (partial logs of a step cut off by the lease come back)
# Extra wheels (test dependencies) may sit in .whl/; data files of the Debian data packages
# (../shared/DATA.md) in .devdata/{mricron,itk} are copied to where those packages put them
# (scripts/gpu_prepare.sh fills both). Order: build, exception probes (rebuilt with the system g++ if
# they crash), CUDA tests, warp, kernel and rendering profiles, Nsight Compute on the kernels that targets
# wait on (if ncu is installed; MEDFAST_GPU_NCU=0 skips it, MEDFAST_GPU_NCU_CAP caps it), training checks, then the benchmark
# suites and the memcheck run in the order of MEDFAST_GPU_SUITES. A lent machine has 15 minutes in all,
# start included; on the H200 the build took 155 s (2026-11-27) and 232 s (2026-11-28). One call of at most
# 600 s, then short calls on the warm machine, each within its 30 s idle time (the build and /tmp/site stay:
# `export PYTHONPATH=/tmp/site; python3 -m medfast bench --device cuda --quick --only SUITE --out $OUT/bench`).
# On 2026-11-28 the CUDA tests took 44-52 s with 8 workers and the sanitizer 29-41 s for two to five families; the
# second lease's call (541 s) skipped the probes and Nsight Compute. For the next lease (what is left: the host
# time of the loss calls and the ultrasound forward with host poses in the kernel profile, the segmentation suite
# with its worker times, the 1 mm segmentation demo with the loader changes, the warp suite), e.g.:
#   MEDFAST_GPU_BUDGET=555 MEDFAST_GPU_PACK=1 MEDFAST_GPU_BENCH=quick MEDFAST_GPU_PROBES=0 MEDFAST_GPU_NCU=0 \
#     MEDFAST_GPU_PROFILES="kernel" MEDFAST_GPU_TEST_CAP=120 MEDFAST_GPU_TEST_WORKERS=8 MEDFAST_GPU_BENCH_CAP=100 \
#     MEDFAST_GPU_DEMO_CAP=150 MEDFAST_GPU_SEG_STEPS=200 MEDFAST_GPU_TRAIN_CHECKS="reg_bf16 cls_sim" \
#     MEDFAST_GPU_SANITIZE="loss" MEDFAST_GPU_SUITES="segmentation demo_seg warp sanitizer" bash scripts/gpu_check.sh
# (carry .whl and .devdata); keep the budget under the call's limit so the packed results come back.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out/gpu}
RES="$OUT"
if [ "${MEDFAST_GPU_PACK:-0}" = 1 ]; then RES=/tmp/medfast_gpu_results; fi
mkdir -p "$OUT" "$RES"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${MEDFAST_GPU_BUDGET:-1000000}))

# Checkpoints, model files, NIfTI outputs and the benchmarks' work folders stay out: the device returns
# files of at most 16 MiB (on 2026-11-27 the checkpoints made the archive too large to come back).
pack() { [ "$RES" = "$OUT" ] || { tar czf "$OUT/.gpu_results.tgz" -C "$RES" --exclude='*.pt' --exclude='*.pth' \
  --exclude='*.nii.gz' --exclude='*.nii' --exclude='./work' . 2>/dev/null &&
  mv -f "$OUT/.gpu_results.tgz" "$OUT/gpu_results.tgz"; }; }
# A step cut off by the machine's own time limit never reaches its pack: repack every 15 s meanwhile,
# so the partial logs of the running step come back too (atomically replaced, never half-written).
if [ "$RES" != "$OUT" ]; then
  ( while sleep 15; do pack; done ) &
  packer=$!
  trap 'kill $packer 2>/dev/null' EXIT
fi

# step NAME CAP_SECONDS CMD...: runs CMD with its output in $RES/NAME.log, capped by the budget.
step() {
  local name=$1 cap=$2 left
  shift 2
  left=$((deadline - SECONDS - 15))
  if [ "$left" -lt 10 ]; then
    echo "[$name] not run: out of time" | tee -a "$RES/steps.log"
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local t0=$SECONDS
  timeout --kill-after=5 "$cap" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc ${cap}s cap, took $((SECONDS - t0)) s" | tee -a "$RES/steps.log"
  tail -n "${TAIL:-4}" "$RES/$name.log"
  pack
  return $rc
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .devdata ] && [ "$(id -u)" -eq 0 ]; then
  [ -d .devdata/mricron/templates ] && [ ! -d /usr/share/mricron/templates ] &&
    mkdir -p /usr/share/mricron && cp -r .devdata/mricron/templates /usr/share/mricron/
  [ -d .devdata/itk/Data ] && [ ! -d /usr/share/doc/insighttoolkit5-examples/examples/Data ] &&
    mkdir -p /usr/share/doc/insighttoolkit5-examples/examples && cp -r .devdata/itk/Data \
      /usr/share/doc/insighttoolkit5-examples/examples/
fi

export MEDFAST_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# A failed build (CMakeLists.txt refuses an extension with a static libstdc++ linked in) is retried once with the
# system g++ if that is another compiler, so the lease still runs the checks.
alt=${MEDFAST_GPU_ALT_CXX:-/usr/bin/g++}
other_cxx() { [ -x "$alt" ] && [ "$(readlink -f "$alt")" != "$(readlink -f "$(command -v g++)")" ]; }
if ! step build 600 $PY -m pip install -v --no-build-isolation --no-deps -e .; then
  tail -40 "$RES/build.log"
  other_cxx || { pack; exit 1; }
  rm -rf build/cp3*
  CXX=$alt CUDAHOSTCXX=$alt step build_alt_cxx 600 $PY -m pip install -v --no-build-isolation --no-deps -e . ||
    { tail -40 "$RES/build_alt_cxx.log"; pack; exit 1; }
fi
step info 60 $PY -m medfast info
# C++ argument checks must reach Python as exceptions (on one H200 build, with /opt/gcc's g++ 13.3, they
# crashed the process). If they do not and the system has another g++, rebuild with that one and probe again.
# MEDFAST_GPU_PROBES=0 skips them (29 s on 2026-11-28, clean with the image's g++ 13.3).
if [ "${MEDFAST_GPU_PROBES:-1}" != 0 ] && ! TAIL=12 step exceptions 120 $PY scripts/exception_probe.py --native; then
  if other_cxx && [ ! -f "$RES/build_alt_cxx.log" ]; then
    rm -rf build/cp3*
    CXX=$alt CUDAHOSTCXX=$alt step build_alt_cxx 600 $PY -m pip install -v --no-build-isolation --no-deps -e . &&
      TAIL=12 step exceptions_alt_cxx 120 $PY scripts/exception_probe.py
  fi
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$RES/nvidia_smi.txt" 2>&1

rc=0
select=()
case "${MEDFAST_GPU_TESTS:-cuda}" in
  none) files=() ;;
  all) files=(tests) ;;
  # the files whose tests need a GPU (the CUDA emulation tests, test_simt*, run on the CPU in CI), and of
  # them only the tests that need one: their names (or their file's) say cuda or cupy. On 2026-11-27 that
  # selection was exactly the 249 tests that a machine without a GPU skips; the other 288 run in CI.
  cuda) mapfile -t files < <(grep -l "requires_cuda\|skipif(not torch.cuda\|import cupy\|importorskip(\"cupy\")" tests/test_*.py)
        select=(-k "cuda or cupy") ;;
  *) read -r -a files <<< "$MEDFAST_GPU_TESTS" ;;
esac
xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n "${MEDFAST_GPU_TEST_WORKERS:-4}")
# A hung test must not eat the machine's time: pytest-timeout (if installed) fails it after 240 s.
$PY -c "import pytest_timeout" 2>/dev/null && xdist+=(--timeout=240)
if [ ${#files[@]} -gt 0 ]; then
  # -v names every test as it ends (a run cut off by the lease still says which failed); 2 CPU threads per
  # worker, so that the workers do not oversubscribe the cores (16 threads each by default)
  TAIL=25 step tests "${MEDFAST_GPU_TEST_CAP:-400}" env OMP_NUM_THREADS=2 $PY -m pytest -v -p no:cacheprovider \
    "${xdist[@]}" "${select[@]}" -rfEs "${files[@]}" || rc=1
fi
# the profiles named in MEDFAST_GPU_PROFILES (default all three)
profiles=" ${MEDFAST_GPU_PROFILES:-warp kernel render} "
[[ $profiles == *" warp "* ]] && TAIL=40 step warp_profile 120 $PY benchmarks/gpu_warp_profile.py --out "$RES"
[[ $profiles == *" kernel "* ]] && TAIL=30 step kernel_profile 120 $PY benchmarks/gpu_kernel_profile.py --out "$RES"
[[ $profiles == *" render "* ]] && TAIL=30 step render_profile 90 $PY benchmarks/gpu_render_profile.py --out "$RES"
# Nsight Compute on one launch of each kernel a target waits on (if ncu is installed and may read the
# performance counters): speed of light, memory workload, occupancy and stall reasons, as text
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
if [ -n "$NCU" ] && [ "${MEDFAST_GPU_NCU:-1}" != 0 ]; then
  TAIL=20 step ncu "${MEDFAST_GPU_NCU_CAP:-60}" "$NCU" --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section WarpStateStats --section LaunchStats --launch-count 12 \
    -k "regex:$($PY benchmarks/gpu_ncu_targets.py --filter)" $PY benchmarks/gpu_ncu_targets.py
fi
# the training checks (AMP, classification rendering in both CUDA marches, torchrun: NCCL and 2 processes
# sharing a GPU over gloo) before the long benchmark suites: they answer more per second of the lease
train_only=()
for c in ${MEDFAST_GPU_TRAIN_CHECKS:-}; do train_only+=(--only "$c"); done
TAIL=30 step train_check 180 $PY scripts/gpu_train_check.py --device cuda --out "$RES/train_check" "${train_only[@]}"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
sanitize() {  # compute-sanitizer memcheck over the families in MEDFAST_GPU_SANITIZE (default: all)
  local only=()
  for f in ${MEDFAST_GPU_SANITIZE:-}; do only+=(--only "$f"); done
  TAIL=12 step sanitizer "${MEDFAST_GPU_SANITIZE_CAP:-240}" "$SANITIZER" --tool memcheck --error-exitcode 3 \
    $PY scripts/cuda_sanitize.py "${only[@]}"
}
quick=()
[ "${MEDFAST_GPU_BENCH:-full}" = quick ] && quick=(--quick)
# benchmark suites in the order given; "sanitizer" in the list places the memcheck run among them
suites=${MEDFAST_GPU_SUITES:-warp loss metrics ultrasound classification segmentation registration distance}
[ "${MEDFAST_GPU_BENCH:-full}" = 0 ] && suites=""
case " $suites " in *" sanitizer "*) ;; *) suites="$suites sanitizer" ;; esac
for suite in $suites; do
  if [ "$suite" = sanitizer ]; then
    if [ -n "$SANITIZER" ]; then sanitize || rc=1; fi
    continue
  fi
  # issue 5's real-brain demos at full resolution, where the list names them (never by default)
  if [ "$suite" = demo_register ]; then
    TAIL=30 step demo_register "${MEDFAST_GPU_DEMO_CAP:-150}" $PY -m medfast register --demo --resolution 1 \
      --device cuda --no-progress --out "$RES/demo_register"
    continue
  fi
  if [ "$suite" = demo_seg ]; then
    seg_steps=${MEDFAST_GPU_SEG_STEPS:-300}
    TAIL=30 step demo_seg "${MEDFAST_GPU_DEMO_CAP:-150}" $PY -m medfast train configs/seg_demo_gpu.yaml \
      --set trainer.max_steps="$seg_steps" --set trainer.val_every="$seg_steps" \
      --set trainer.checkpoint_every="$seg_steps" --out "$RES/demo_seg"
    continue
  fi
  # a suite cut off by its cap: its own log (under work/, which the pack leaves out) is appended to the step's
  TAIL=30 step "bench_$suite" "${MEDFAST_GPU_BENCH_CAP:-300}" env MEDFAST_BENCH_WORK="$RES/work" $PY -m medfast bench \
    --device cuda "${quick[@]}" --only "$suite" --out "$RES/bench" ||
    tail -n 40 "$RES/work/$suite/log.txt" >> "$RES/bench_$suite.log" 2>/dev/null
done
# the targets of the open issues against these results (scripts/gpu_summary.py), beside the logs
$PY scripts/gpu_summary.py "$RES" > "$RES/summary.md" 2>&1 && cat "$RES/summary.md"
pack
exit $rc
