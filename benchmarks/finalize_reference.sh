#!/usr/bin/env bash
# Turn a finished reference training run into a candidate for shipping, on validation data only:
#   bash benchmarks/finalize_reference.sh RUN OUT
# 1. OUT/model.keras: the best epoch's weights, no optimizer state, float32 compute (a run trained
#    in mixed bfloat16 ships in float32), with the run's config.json and history.csv;
# 2. inference defaults chosen on the three val splits (xmdl_tf.tune --write, OUT/tune.json);
# 3. calibration fitted on the val splits (xmdl_tf.calibrate; OUT/calibration.txt, OUT/reliability.png);
# 4. whole-slice scores with and without TTA (OUT/eval/<set>[_tta]/metrics.json) and 3-D scores
#    (OUT/eval3d/...), reported for the model card; they take no part in any choice.
# Whether OUT replaces the shipped model is decided by its val scores against the shipped model's
# (benchmarks/report.py prints both); the test splits decide nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: finalize_reference.sh RUN OUT}
OUT=${2:?usage: finalize_reference.sh RUN OUT}
PY=${PYTHON:-.venv/bin/python}
D=${XMDL_DATA:-../shared/data}
SETS=("$D/cdeep3m_sbem_mouse" "$D/drosophila_vnc_sstem" "$D/lucchipp_fibsem_mouse")
PX=(unknown 4.6 5)
run() { echo "+ $*" >&2; nice -n 10 "$@"; }

[ -f "$RUN/model.keras" ] && [ -f "$RUN/config.json" ] || { echo "$RUN: no model.keras and config.json (not a finished run)" >&2; exit 2; }
[ -e "$OUT" ] && { echo "$OUT: exists; choose a new folder (nothing is overwritten)" >&2; exit 2; }
mkdir -p "$OUT"
run "$PY" -c "import sys; from xmdl_tf.predict import load_keras; from xmdl_tf.model import float32_copy
float32_copy(load_keras(sys.argv[1])).save(sys.argv[2])" "$RUN/model.keras" "$OUT/model.keras"
cp "$RUN/config.json" "$RUN/history.csv" "$OUT/"
[ -f "$RUN/training_curves.png" ] && cp "$RUN/training_curves.png" "$OUT/"

run "$PY" -m xmdl_tf.tune --model "$OUT" --data "${SETS[@]}" --pixel-size "${PX[@]}" --write --json "$OUT/tune.json"
run "$PY" -m xmdl_tf.calibrate --model "$OUT" --data "${SETS[@]}" --pixel-size "${PX[@]}" \
    --figure "$OUT/reliability.png" 2>&1 | tee "$OUT/calibration.txt"

for i in 0 1 2; do
  name=$(basename "${SETS[$i]}")
  px=()
  [ "${PX[$i]}" != unknown ] && px=(--pixel-size "${PX[$i]}")
  run "$PY" -m xmdl_tf.evaluate --model "$OUT" --data "${SETS[$i]}" "${px[@]}" --tta --out "$OUT/eval/${name}_tta"
  run "$PY" -m xmdl_tf.evaluate --model "$OUT" --data "${SETS[$i]}" "${px[@]}" --no-tta --out "$OUT/eval/${name}"
done
run "$PY" -m xmdl_tf.evaluate --volume --model "$OUT" --data "$D/lucchipp_fibsem_mouse" --voxel-size 5 5 5 --out "$OUT/eval3d/lucchi_val"
run "$PY" -m xmdl_tf.evaluate --volume --model "$OUT" --data "$D/cdeep3m_sbem_mouse" --out "$OUT/eval3d/sbem_test"
"$PY" benchmarks/report.py "$OUT"/eval/*/metrics.json
