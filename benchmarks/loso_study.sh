#!/usr/bin/env bash
# Augmentation study, leave-one-set-out at a fixed budget (resumable: rerun this script).
#   bash benchmarks/loso_study.sh [ARM ...]
# An arm is "em", "basic", or "em-PART[+PART...]": "em" with those parts switched off
# (parts: xmdl_tf.config.AugmentConfig.COMPONENTS), e.g. em-scale, em-elastic,
# em-stripes+illumination+poisson; or "em_scale_MIN_MAX": "em" with the random zoom
# drawn from MIN..MAX instead of 0.7..1.4 (e.g. em_scale_0.5_2). Default: em basic.
# SEED=N (environment) trains with --seed N into runs/loso/ARM_seedN (another draw of the same arm). Tables in runs/loso/ARM/loso.md.
cd "$(dirname "$0")/.."
D=${XMDL_DATA:-../shared/data}
COMMON=(--data $D/cdeep3m_sbem_mouse $D/drosophila_vnc_sstem $D/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5
        --model-pixel-size 5 --epochs 6 --steps-per-epoch 100)
[ $# -eq 0 ] && set -- em basic
for arm in "$@"; do
  case $arm in
    em|basic) flags=(--augment "$arm") ;;
    em_scale_*_*) IFS=_ read -r _ _ lo hi <<< "$arm"; flags=(--augment em --augment-scale "$lo" "$hi") ;;
    em-*) IFS=+ read -ra off <<< "${arm#em-}"; flags=(--augment em --augment-off "${off[@]}") ;;
    *) echo "unknown arm $arm (em, basic, em-PART[+PART...] or em_scale_MIN_MAX)" >&2; exit 2 ;;
  esac
  out=runs/loso/$arm
  [ -n "$SEED" ] && { out=${out}_seed$SEED; flags+=(--seed "$SEED"); }
  nice -n 10 "${PYTHON:-.venv/bin/python}" benchmarks/loso.py --out "$out" "${COMMON[@]}" "${flags[@]}" || exit 1
done
