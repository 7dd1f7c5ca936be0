#!/usr/bin/env bash
# The main job on real data (images that ship in the nilearn wheel and Debian packages, installed by
# scripts/setup.sh): every demo writes NIfTI, PNG and JSON results under out/demo/<name>.
#   warp          MNI152 T1 warped by a random smooth deformation; speed against the grid_sample route
#   simulate      ultrasound sweep over the InVesalius head CT (frames, NIfTI stack, CT-vs-US figure)
#   register      Colin27 -> MNI152 T1 (random affine added): affine + deformable, tissue overlap per stage
#   regtrain      LocalNet trained on MNI152 (4 mm) to undo random deformations; tissue Dice / LNCC on
#                 held-out deformations before / after (about 10 min on a 2-core CPU)
#   segment       UNet tissue segmentation trained on MNI152 (3 mm, augmented), Dice/HD95 on held-out
#                 deformations and on the ITK KmeansTest subject (about 6-13 min on a 2-core CPU)
#   classify      DenseNet standard-plane classifier on ultrasound simulated on the fly from MNI152 + Colin27;
#                 balanced accuracy on held-out poses and on a held-out brain (ITK KmeansTest), CAM PNG
#   synthesize    conditional GANs trained on ultrasound simulated on the fly: head CT slice -> frame
#                 (out/demo/synthesize) and probe pose -> frame over Colin27 (out/demo/synthesize_pose,
#                 plus frames generated along a held-out sweep); PSNR/SSIM/SWD before vs after, PNG grids
# Usage: scripts/demo.sh [all|warp|simulate|register|regtrain|segment|classify|synthesize ...]   (default: all)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
demos=("$@")
[ ${#demos[@]} -eq 0 ] || [ "${demos[0]}" = "all" ] && demos=(warp simulate register regtrain segment classify synthesize)
for d in "${demos[@]}"; do
  echo "=== medfast demo: $d"
  # each demo is a fresh run: medfast train refuses a folder that holds another run's checkpoints
  case "$d" in
    regtrain|segment|classify) rm -rf "out/demo/$d" ;;
    synthesize) rm -rf out/demo/synthesize out/demo/synthesize_pose ;;
  esac
  case "$d" in
    warp) medfast demo --out out/demo/warp ;;
    simulate) medfast simulate --out out/demo/simulate ;;
    register) medfast register --demo --out out/demo/register ;;
    regtrain) medfast train configs/reg_demo_cpu.yaml --set trainer.out_dir=out/demo/regtrain ;;
    segment) medfast train configs/seg_demo_cpu.yaml --set trainer.out_dir=out/demo/segment ;;
    classify) medfast train configs/cls_demo_cpu.yaml --set trainer.out_dir=out/demo/classify ;;
    synthesize)
      medfast train configs/synth_demo_cpu.yaml --set trainer.out_dir=out/demo/synthesize
      medfast train configs/synth_pose_demo_cpu.yaml --set trainer.out_dir=out/demo/synthesize_pose
      medfast synthesize out/demo/synthesize_pose/checkpoints/last.pt --frames 16 \
        --out out/demo/synthesize_pose/generated ;;
    *) echo "unknown demo '$d' (warp, simulate, register, regtrain, segment, classify, synthesize, all)" >&2
       exit 2 ;;
  esac
done
echo "results under out/demo/"
