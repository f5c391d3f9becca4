#!/usr/bin/env bash
# Augmentation study, leave-one-set-out at a fixed budget (resumable: rerun this script).
#   bash benchmarks/loso_study.sh [ARM ...]
# An arm is "em", "basic", or "em-PART[+PART...]": "em" with those parts switched off
# (parts: xmdl_tf.config.AugmentConfig.COMPONENTS), e.g. em-scale, em-elastic,
# em-stripes+illumination+poisson; or "em_scale_MIN_MAX": "em" with the random zoom
# drawn from MIN..MAX instead of the default (e.g. em_scale_0.7_1.4).
# Any arm may end in ",FLAG=VALUE[,FLAG=VALUE...]": more `xmdl_tf.train` options for the
# other choices the study makes (loss, model size), e.g. em,loss=dice_ce or em,base-filters=16.
# Default: em basic.
# SEED=N (environment) trains with --seed N into runs/loso/ARM_seedN (another draw of the same arm). Tables in runs/loso/ARM/loso.md.
cd "$(dirname "$0")/.."
D=${XMDL_DATA:-../shared/data}
COMMON=(--data $D/cdeep3m_sbem_mouse $D/drosophila_vnc_sstem $D/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5
        --model-pixel-size 5 --epochs 6 --steps-per-epoch 100)
[ $# -eq 0 ] && set -- em basic
for arm in "$@"; do
  IFS=, read -ra parts <<< "$arm"
  base=${parts[0]}
  case $base in
    em|basic) flags=(--augment "$base") ;;
    em_scale_*_*) IFS=_ read -r _ _ lo hi <<< "$base"; flags=(--augment em --augment-scale "$lo" "$hi") ;;
    em-*) IFS=+ read -ra off <<< "${base#em-}"; flags=(--augment em --augment-off "${off[@]}") ;;
    *) echo "unknown arm $arm (em, basic, em-PART[+PART...] or em_scale_MIN_MAX, then ,FLAG=VALUE...)" >&2; exit 2 ;;
  esac
  for kv in "${parts[@]:1}"; do
    case $kv in
      ?*=?*) flags+=("--${kv%%=*}" "${kv#*=}") ;;
      *) echo "arm $arm: '$kv' is not FLAG=VALUE (e.g. loss=dice_ce)" >&2; exit 2 ;;
    esac
  done
  out=runs/loso/$arm
  [ -n "$SEED" ] && { out=${out}_seed$SEED; flags+=(--seed "$SEED"); }
  nice -n 10 "${PYTHON:-.venv/bin/python}" benchmarks/loso.py --out "$out" "${COMMON[@]}" "${flags[@]}" || exit 1
done
