#!/usr/bin/env bash
# Installs what the trainer needs, then trains ResNet-8 with CLARS (no
# warmup, batch 1024) on offline Fashion-MNIST, evaluates and exports a
# SavedModel. Extra arguments go to the trainer (e.g. --params_override).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONUNBUFFERED=1
model_dir="${MODEL_DIR:-runs/fashion_mnist_resnet8_clars}"
# clars-train hides TensorFlow's INFO lines itself (--verbosity shows them).
"${CLARS_VENV:-.venv}/bin/clars-train" \
  --config_file=fashion_mnist_resnet8_clars \
  --model_dir="$model_dir" --mode=train_and_eval "$@"
cat <<EOF_MSG

Done. Everything is under $model_dir:
  checkpoints/   tf.train checkpoints (rerun the same command to resume)
  train/ eval/   TensorBoard events: ${CLARS_VENV:-.venv}/bin/tensorboard --logdir $model_dir
  results.json   config, per-epoch metrics, final test accuracy
  export/        SavedModel: tf.saved_model.load("$model_dir/export")
                 .signatures["serving_default"](images=uint8 [N,28,28,1])
The environment is ${CLARS_VENV:-.venv}/: run the trainer yourself with
  ${CLARS_VENV:-.venv}/bin/clars-train --config_file=NAME_OR_PATH --model_dir=...
EOF_MSG
