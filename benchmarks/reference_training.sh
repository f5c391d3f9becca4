#!/usr/bin/env bash
# The reference model's training (resumable: run the same command again to continue).
#   bash benchmarks/reference_training.sh OUT [BASE_FILTERS] [extra train flags...]
# Three sets sampled in equal shares, SBEM at its own (unknown) pixel size, the
# others resampled to the model's 5 nm; "em" augmentation (chosen by the
# leave-one-set-out study, models/loso/); cosine decay over 80 epochs of 1,200
# tiles (96,000 tiles); EarlyStopping patience 10 on the mean of the three
# sets' pooled validation losses.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: reference_training.sh OUT [BASE_FILTERS] [flags...]}
F=${2:-8}
shift $(( $# > 1 ? 2 : 1 ))
D=${XMDL_DATA:-../shared/data}
exec nice -n 10 "${PYTHON:-.venv/bin/python}" -m xmdl_tf.train \
  --data $D/cdeep3m_sbem_mouse $D/drosophila_vnc_sstem $D/lucchipp_fibsem_mouse \
  --pixel-size unknown 4.6 5 --model-pixel-size 5 --base-filters "$F" \
  --augment em --epochs 80 --steps-per-epoch 150 --lr-schedule cosine --patience 10 \
  --out "$OUT" "$@"
