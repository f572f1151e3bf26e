#!/usr/bin/env bash
# GPU check sized for a 10-minute window on one GPU (every step has a
# timeout; they add up to 9.5 minutes): the library tests, a short
# mixed-precision training with XLA auto-clustering, and the cost benchmarks,
# including loop vs one-pass estimator vs LARS on ResNet-50 at 224 px. Needs a machine with a GPU build of TensorFlow 2.16+
# (`pip install "tensorflow[and-cuda]"`) plus tensorflow-datasets, absl-py,
# pyyaml and pytest. Results go to $OUT (default gpu_check_out/).
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
status=0

python3 - <<'PY' 2>&1 | tee "$out/devices.txt"
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("TensorFlow", tf.__version__, "GPUs:", gpus)
if not gpus:
    raise SystemExit("no GPU visible to TensorFlow: install tensorflow[and-cuda]")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

# 1. Library tests on the GPU (about 1 minute).
timeout 120 python3 -m pytest -q tests/test_layerwise.py tests/test_clars.py \
  tests/test_lars.py tests/test_gradient_norms.py tests/test_schedules.py \
  tests/test_one_pass_norms.py -k "not trainer" \
  tests/test_training.py tests/test_serialization.py 2>&1 | tee "$out/tests.log" \
  || status=1

# 2. Short training: ResNet-20, CLARS, float16 with loss scaling, XLA
#    auto-clustering, synthetic data (about 2 minutes).
TF_XLA_FLAGS=--tf_xla_auto_jit=2 timeout 120 python3 -m trainers.train \
  --config_file=configs/fashion_mnist_resnet8_clars.yaml \
  --model_dir="$out/train_run" --strategy=one_device --mode=train_and_eval \
  --params_override="task.dataset=synthetic,model.name=resnet20,train.precision=mixed_float16,train.global_batch_size=1024,train.epochs=8,train.steps_per_loop=8,train.checkpoint_every_steps=64,estimator.num_micro_batches=64" \
  2>&1 | tee "$out/train.log" || status=1

# 3. Cost benchmarks (ratios measured side by side), about 5 minutes.
timeout 60 python3 -m benchmarks.optimizer_step --rounds=5 \
  --output "$out/optimizer_step.json" 2>&1 | tee "$out/optimizer_step.log" \
  || status=1
timeout 90 python3 -m benchmarks.train_step --nomirrored --noper_example \
  --j_sweep=64 --refresh_every=1 --rounds=3 --warmup=1 \
  --candidates=lars,clars_s8_j64,one_pass_s8_j64,one_pass_s8_j128 \
  --output "$out/train_step.json" 2>&1 | tee "$out/train_step.log" || status=1
# ResNet-50, 224 px, batch 256 on one GPU: J * s = 32 * 8 = B.
timeout 180 python3 -m benchmarks.train_step --model=resnet50 \
  --image_size=224 --num_classes=1000 --batch_size=256 \
  --num_micro_batches=32 --j_sweep=32 --refresh_every=1 --nomirrored \
  --noper_example --rounds=3 --steps=2 --warmup=1 \
  --candidates=lars,clars_s8_j32,one_pass_s8_j32 \
  --output "$out/train_step_resnet50.json" 2>&1 \
  | tee "$out/train_step_resnet50.log" || status=1
exit $status
