#!/usr/bin/env bash
# Augmentation study, leave-one-set-out at a fixed budget (resumable: rerun this script).
cd "$(dirname "$0")/.."
D=../shared/data
COMMON=(--data $D/cdeep3m_sbem_mouse $D/drosophila_vnc_sstem $D/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5
        --model-pixel-size 5 --epochs 6 --steps-per-epoch 100)
for cfg in em basic; do
  nice -n 10 .venv/bin/python benchmarks/loso.py --out runs/loso/$cfg "${COMMON[@]}" --augment $cfg || exit 1
done
