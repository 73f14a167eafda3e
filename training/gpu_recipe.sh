#!/usr/bin/env bash
# The GPU recipe of default-3d (issue 13): on a machine with one CUDA GPU, build the permissive dataset,
# train the matching-3d design for at most 8 minutes (training/configs/matching-3d-gpu.yaml), evaluate the
# network path on ../shared/data when it is there, and export the model with its card under the name
# default-3d-gpu (register(model="default-3d-gpu") then uses it). Never needed by CI or the README.
#
#   bash training/gpu_recipe.sh                 # from the repository root or anywhere
#   SHARED=/path/to/shared/data bash training/gpu_recipe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
OUT=${OUT:-runs/gpu-3d}
T=$SHARED/templates
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_recipe.sh: no CUDA GPU here; the CPU recipe is in training/README.md')"
if [ ! -f runs/data/default3d.h5 ]; then
  python training/make_dataset.py runs/data/default3d.h5 "$T/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz" \
    "$T/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz" "$T/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz" \
    "$T/colin27_ch2.nii.gz" "$T/colin27_ch2bet.nii.gz" "$T/ants_mni.nii.gz" "$T/itk_examples/KmeansTest_T1UCharRaw.nii.gz" \
    --spacing 1.6 --shape 112 128 112 --synthetic 24 --val-fraction 0.1 --seed 1 --pairs inter
fi
python training/train.py --config training/configs/matching-3d-gpu.yaml --out "$OUT"
EVAL=()
if [ -d "$SHARED/eth_liver" ]; then
  python training/evaluate.py --suite shared --data-root "$SHARED" --model "$OUT/model.pt" --device cuda --out "$OUT-eval"
  EVAL=(--evaluation "$OUT-eval")
fi
python training/export_model.py "$OUT" --name default-3d-gpu "${EVAL[@]}" \
  --description "3D matching-3d network trained on one GPU for <= 8 min (training/gpu_recipe.sh) on synthetic deformations of permissive templates and synthetic shapes" \
  --train-command "bash training/gpu_recipe.sh"
