#!/usr/bin/env bash
# The README's demo: a tiny CLIP trained on demo shards with 2 CPU processes, then zero-shot top-1
# on the held-out images. Extra arguments are config overrides (e.g. train.epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DATA=${DATA:-data/demo}
meta() { "$VENV/bin/python" -c "import json,sys; print(json.load(open('$DATA/dataset.json'))[sys.argv[1]])" "$1"; }
classes=$("$VENV/bin/python" -c "import json; print(json.dumps(json.load(open('$DATA/dataset.json'))['class_names']))")
extra=()
# The MNIST sample fallback has 4,000 training images instead of 60,000: train more epochs.
[ "$(meta name)" = fashion-mnist ] || extra+=(train.epochs=20)
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=1
start=$(date +%s)
"$VENV/bin/torchrun" --standalone --nproc_per_node="$NPROC" -m lvmtrain train configs/debug/clip.yaml \
  "data.train=$(meta train)" "data.val=$(meta test)" "eval.class_names=$classes" run.name=clip_debug run.overwrite=true \
  "${extra[@]}" "$@"
echo "demo: $(( $(date +%s) - start )) s for training and evaluation on $NPROC CPU processes"
