r"""Trains, evaluates and exports an image classifier with CLARS or a baseline.

    clars-train --config_file=fashion_mnist_resnet8_clars \
        --model_dir=/tmp/run --mode=train_and_eval

(`python3 -m trainers.train` from a checkout takes the same flags;
--config_file takes a path or the name of a bundled config.)

Flags follow TF Model Garden: --config_file, --params_override, --mode
(train, eval, train_and_eval, export), --model_dir, --strategy, --tpu,
--data_dir. One readable custom loop under `strategy.run` (Keras 3
`model.fit` fails under MultiWorkerMirroredStrategy); CLARS gets its
gradient-norm estimates from `clars_tf.compute_loss_gradients_and_norms`.
"""

import fcntl
import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

flags.DEFINE_string("config_file", None,
                    "YAML experiment config: a path, or a bundled config's "
                    "name such as imagenet/resnet50_32k_clars.")
flags.DEFINE_string("params_override", "",
                    "Overrides: 'a.b=1,c.d=x' or a YAML mapping.")
flags.DEFINE_enum("mode", "train_and_eval",
                  ["train", "eval", "train_and_eval", "export"],
                  "What to run.")
flags.DEFINE_string("model_dir", None, "Checkpoints, summaries, results.")
flags.DEFINE_string("export_dir", None,
                    "SavedModel destination; default MODEL_DIR/export.")
flags.DEFINE_enum("strategy", "default",
                  ["tpu", "mirrored", "multi_worker_mirrored", "one_device",
                   "default"], "tf.distribute strategy.")
flags.DEFINE_string("tpu", "", "TPU name, grpc:// address or 'local'.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_integer("cpu_devices", 1,
                     "Split the CPU into this many logical devices (runs "
                     "--strategy=mirrored on one CPU, for tests).")
FLAGS = flags.FLAGS

USER_ERRORS = (ValueError, RuntimeError, OSError)


class TrainerError(RuntimeError):
    """A run that cannot proceed; the message says why and what to do."""


class ModelDirLock:
    """Refuses a second trainer on the same model_dir while one runs.

    An advisory `flock` is released by the kernel when the holder dies, so a
    killed run never leaves a stale lock behind.
    """

    def __init__(self, model_dir, name):
        os.makedirs(model_dir, exist_ok=True)
        self._file = open(os.path.join(model_dir, f".lock-{name}"), "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainerError(
                f"Another trainer is already using --model_dir={model_dir}. "
                "Wait for it to finish or pick another --model_dir.") from None
        self._file.write(str(os.getpid()))
        self._file.flush()


def _console(line):
    """One line of the trainer's own progress report, on stdout."""
    print(line, flush=True)


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _quiet_unless_verbose():
    """Leaves the console to the trainer's own lines and warnings.

    TensorFlow, absl and tfds INFO lines come back with --verbosity.
    Must run before TensorFlow is imported (TF_CPP_MIN_LOG_LEVEL); the
    `clars-train` command does the same before it imports this module.
    """
    from . import startup
    with startup.quiet_tensorflow_import(sys.argv):
        import tensorflow as tf
        import tensorflow_datasets as tfds
    if FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("WARNING")
    tfds.disable_progress_bar()


def _finite_or_null(value):
    """`value` with each inf and NaN replaced by None.

    Python would write them as Infinity and NaN, which strict JSON readers
    (jq, JavaScript, most other languages) refuse. Non-finite values here
    are `lars.trust_clip: .inf`, whose null means no clip as in `LARS`,
    and a NaN metric, whose null means no number.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _strict_json(content, indent=None):
    return json.dumps(_finite_or_null(content), indent=indent,
                      allow_nan=False)


def _write_json_atomically(path, content):
    staging = f"{path}.partial-{os.getpid()}"
    with open(staging, "w", encoding="utf-8") as f:
        f.write(_strict_json(content, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def _nonfinite_flags(gradients, norms):
    """1.0 for each variable whose gradient or estimate is not finite."""
    import tensorflow as tf

    flags = []
    for index, gradient in enumerate(gradients):
        finite = (tf.constant(True) if gradient is None
                  else tf.reduce_all(tf.math.is_finite(gradient)))
        if norms:
            finite = tf.logical_and(finite, tf.math.is_finite(norms[index]))
        flags.append(tf.cast(tf.logical_not(finite), "float32"))
    return tf.stack(flags)


def _replica_mean_of_floats(context, values):
    """Float values averaged across replicas; others (seed states) as is.

    Each replica computes batch-norm moving statistics from its own examples;
    averaging them keeps one set, the moving means a single device computes
    from the whole global batch (equal per-replica batches).
    """
    import tensorflow as tf

    values = list(values)
    # One all-reduce per dtype: a batched all-reduce concatenates its inputs.
    for dtype in {v.dtype for v in values if v.dtype.is_floating}:
        group = [i for i, v in enumerate(values) if v.dtype == dtype]
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                   [values[i] for i in group])
        for i, mean in zip(group, means):
            values[i] = mean
    return values


def _first_flag_code(flags):
    """0 if no flag is set, else `len(flags) - i` for the first set flag i."""
    import tensorflow as tf

    count = tf.shape(flags)[0]
    first = tf.argmax(tf.cast(flags > 0, "int32"), output_type="int32")
    return tf.where(tf.reduce_any(flags > 0), count - first, 0)


class Trainer:
    """Holds what one run needs: strategy, data, model, optimizer, state."""

    def __init__(self, config, strategy, model_dir, data_dir,
                 strategy_name="default", estimator=None):
        import keras
        import tensorflow as tf

        import clars_tf
        from clars_tf.trainers import builders
        from clars_tf.trainers import data
        from clars_tf.trainers import distribution

        self.config = config
        self.strategy = strategy
        self.strategy_name = strategy_name
        self.model_dir = model_dir
        self.data_dir = data_dir
        self.is_chief = distribution.is_chief(strategy)
        task, train = config["task"], config["train"]
        self.info = data.DATASETS[task["dataset"]]
        self.global_batch = train["global_batch_size"]
        self.replicas = strategy.num_replicas_in_sync
        self.estimator = estimator
        validation = task["validation_examples"]
        # Positions in the train split: None means every example.
        self.training_indices = (
            data.training_indices(task["dataset"], validation)
            if validation else None)
        self.validation_indices = (
            data.validation_indices(task["dataset"], validation)
            if validation else None)
        self.steps_per_epoch = data.steps_per_epoch(
            task["dataset"], self.global_batch, validation)
        total = train["epochs"] * self.steps_per_epoch
        self.last_step = min(total, train["max_steps"] or total)

        if train["deterministic"]:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(train["seed"])
        # Always set: a previous Trainer in this process may have changed it.
        keras.mixed_precision.set_global_policy(train["precision"])
        with strategy.scope():
            self.model = builders.model(config)
            self.optimizer = builders.optimizer(config, self.steps_per_epoch)
            self.optimizer.build(self.model.trainable_variables)
        self.update_optimizer = getattr(self.optimizer, "inner_optimizer",
                                        self.optimizer)
        self.loss_scaled = self.update_optimizer is not self.optimizer
        self.sgd_decay_rate = builders.sgd_decay_rate(config)
        self.loss_fn = builders.per_example_loss(self.info.num_classes,
                                                 train["label_smoothing"])
        # Running sums of the current epoch, checkpointed so a resumed run
        # reports the same epoch metrics as an uninterrupted one.
        self.epoch_sums = tf.Variable(tf.zeros([3], "float64"),
                                      trainable=False, name="epoch_sums")
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer,
            epoch_sums=self.epoch_sums)
        directory = os.path.join(model_dir, "checkpoints")
        if not self.is_chief:
            directory = os.path.join(
                model_dir, f"worker-temp-{distribution.task_id(strategy)}")
        self.checkpoints = tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=train["checkpoints_to_keep"])
        self._tf, self._clars_tf, self._data = tf, clars_tf, data
        self._results_path = os.path.join(model_dir, "results.json")
        self._steps_path = os.path.join(model_dir, "steps.jsonl")
        self._diagnostics_path = os.path.join(model_dir, "diagnostics.jsonl")
        summary_root = model_dir if self.is_chief else os.path.join(
            directory, "summaries")
        self.train_writer = tf.summary.create_file_writer(
            os.path.join(summary_root, "train"))
        self.eval_writer = tf.summary.create_file_writer(
            os.path.join(summary_root, "eval"))
        # Built on first use, then kept for the run: the compiled loops and
        # the evaluation data (read once, see `evaluate`).
        self._train_loop = None
        self._write_summaries = None
        self._eval_step = None
        self._eval_datasets = {}
        self._batch_norm_passes = {}
        # Wall seconds of this process since the last epoch entry: training
        # steps, evaluation and batch-norm recomputation, reported apart.
        self._epoch_seconds = dict.fromkeys(
            ("training", "evaluation", "batch_norm"), 0.0)
        # When the epoch being trained began, in wall and process CPU
        # seconds: the last epoch entry, or the start of `train` for the
        # first epoch of a (re)started run.
        self._epoch_began = None

    # Data ------------------------------------------------------------------

    def _distributed(self, split, is_training, seed, batch_size,
                     repeat=False, indices=None, **position):
        config = self.config

        def dataset_fn(input_context):
            dataset = self._data.build_dataset(
                config["task"]["dataset"], split, data_dir=self.data_dir,
                global_batch_size=batch_size, is_training=is_training,
                image_size=config["task"]["image_size"], seed=seed,
                input_context=input_context, indices=indices, **position)
            return dataset.repeat() if repeat else dataset

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def _train_iterator(self, step):
        """Batches from `step` to the end of the run, or of its epoch.

        The data order is a function of (seed, epoch), so a resumed run
        starts a fresh pipeline at its step instead of replaying the steps
        before it; one rule for every strategy (a distributed tf.data
        iterator cannot be checkpointed). Data held in memory is read by
        one pipeline to the run's last step (no iterator is torn down and
        rebuilt at each epoch); ImageNet gets one pipeline per epoch.
        """
        epoch, start_step = divmod(step, self.steps_per_epoch)
        epochs = (-(-self.last_step // self.steps_per_epoch) - epoch
                  if self._iterator_spans_run else 1)
        return iter(self._distributed(
            self.info.train_split, True, self.config["train"]["seed"],
            self.global_batch, indices=self.training_indices, epoch=epoch,
            epochs=max(epochs, 1), start_step=start_step))

    @property
    def _iterator_spans_run(self):
        return self.info.in_memory

    # Steps -----------------------------------------------------------------

    def _replica_train_step(self, images, labels):
        tf = self._tf
        variables = self.model.trainable_variables
        num_classes = self.info.num_classes
        with tf.control_dependencies([tf.debugging.assert_less(
                tf.cast(labels, "int32"), num_classes,
                message=f"A label is >= {num_classes}, the number of classes "
                        "of this data set: the data does not match the "
                        "config's task.dataset.")]):
            images, labels = tf.identity(images), tf.identity(labels)
        out = self._clars_tf.compute_loss_gradients_and_norms(
            self.model, self.loss_fn, images, labels,
            global_batch_size=self.global_batch, optimizer=self.optimizer,
            estimator=self.estimator, defer_state_updates=True)
        gradients = out.gradients
        if self.sgd_decay_rate:
            gradients = self._add_sgd_decay(gradients, variables)
        norms = out.gradient_norms or []
        flags = _nonfinite_flags(gradients, norms)
        state_variables = [v for v, _ in out.state_updates]
        state_values = [value for _, value in out.state_updates]
        context = tf.distribute.get_replica_context()
        if context and context.num_replicas_in_sync > 1:
            # Every replica must take the same branch below: agree on the
            # flags.
            flags = context.all_reduce("SUM", flags)
            state_values = _replica_mean_of_floats(context, state_values)
        bad = _first_flag_code(flags)

        def update(gradients, norms, state_values):
            self._clars_tf.apply_state_updates(
                zip(state_variables, state_values))
            if norms:
                self.update_optimizer.set_gradient_norms(norms, variables)
            self.optimizer.apply(gradients, variables)

        def decide(distribution, gradients, norms, state_values, bad):
            # A branch that synchronizes replicas must be chosen in
            # cross-replica context (as Keras's LossScaleOptimizer does).
            bad = distribution.experimental_local_results(bad)[0]

            def skip():
                if self.loss_scaled:
                    # What LossScaleOptimizer does with non-finite gradients:
                    # halve the scale, restart its growth count, apply
                    # nothing (its `apply` would also trace the update).
                    scaler = self.optimizer
                    scaler.step_counter.assign(0)
                    scaler.dynamic_scale.assign(scaler.dynamic_scale * 0.5)
                # Keep the step count in line with the data consumed, so a
                # resumed run replays the same batches.
                self.update_optimizer.iterations.assign_add(1)

            tf.cond(tf.equal(bad, 0),
                    lambda: distribution.extended.call_for_each_replica(
                        update, args=(gradients, norms, state_values)),
                    skip)

        tf.distribute.get_replica_context().merge_call(
            decide, args=(gradients, norms, state_values, bad))
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(out.predictions, -1, output_type="int32"),
                     tf.cast(labels, "int32")), "float32"))
        return out.loss, correct, tf.cast(bad, "float32")

    def _add_sgd_decay(self, gradients, variables):
        """SGD's coupled L2 term, `g + decay_rate * w`, for this replica.

        Each replica adds its share, as the gradients are summed next, in
        the units of the gradients: multiplied by the loss scale under
        `mixed_float16`, which the LossScaleOptimizer then divides out. A
        variable without a gradient still decays.
        """
        tf = self._tf
        share = self.sgd_decay_rate / self.replicas
        if self.loss_scaled:
            share *= self.optimizer.dynamic_scale
        decays = [tf.cast(share * tf.convert_to_tensor(v), v.dtype)
                  for v in variables]
        return [d if g is None else g + tf.cast(d, g.dtype)
                for g, d in zip(gradients, decays)]

    def _make_train_loop(self):
        tf, strategy = self._tf, self.strategy
        # Loss-scaled steps overflow now and then by design: never stop.
        stop = (self.config["train"]["on_nonfinite"] == "stop"
                and not self.loss_scaled)
        replica_step = self._compiled(self._replica_train_step)

        @tf.function
        def train_loop(iterator, steps):
            loss_sum = tf.constant(0.0)
            correct = tf.constant(0.0)
            first_bad_step = tf.constant(-1)
            bad_code = tf.constant(0)
            skipped = tf.constant(0)
            for step in tf.range(steps):
                loss, hits, bad = strategy.run(replica_step,
                                               args=next(iterator))
                # Identical on every replica after the all-reduce.
                bad = tf.cast(strategy.reduce("MEAN", bad, axis=None),
                              "int32")
                if bad > 0:
                    skipped += 1
                    if first_bad_step < 0:
                        first_bad_step = step
                        bad_code = bad
                    if stop:
                        break
                else:
                    loss_sum += strategy.reduce("SUM", loss, axis=None)
                    correct += strategy.reduce("SUM", hits, axis=None)
            # Read here, not by the host after the call: one round trip per
            # loop for everything the console and logs show.
            rate = tf.cast(self.optimizer.learning_rate, "float32")
            return loss_sum, correct, first_bad_step, bad_code, skipped, rate

        return train_loop

    def _make_summary_writer(self):
        """Writes one loop's training scalars in one compiled call (five
        eager `tf.summary.scalar` calls cost more than a short loop)."""
        tf = self._tf
        names = ("loss", "skipped_steps", "accuracy", "learning_rate",
                 "images_per_second")

        @tf.function
        def write(step, values):
            with self.train_writer.as_default(step=step):
                for index, name in enumerate(names):
                    tf.summary.scalar(name, values[index])

        return lambda step, **values: write(
            tf.constant(step, "int64"),
            tf.constant([values[name] for name in names], "float32"))

    def _compiled(self, replica_fn):
        """`replica_fn`, compiled with XLA when train.jit_compile is set.

        TPUStrategy compiles every replica function anyway.
        """
        if not self.config["train"]["jit_compile"] or (
                self.strategy_name == "tpu"):
            return replica_fn
        return self._tf.function(replica_fn, jit_compile=True)

    def _make_eval_step(self):
        """The compiled evaluation step; built once per trainer (`evaluate`)."""
        tf, strategy = self._tf, self.strategy

        def replica_eval(images, labels, weights):
            # Padding examples have weight 0 and count nowhere.
            logits = tf.cast(self.model(images, training=False), "float32")
            loss = tf.reduce_sum(self.loss_fn(labels, logits) * weights)
            hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type="int32"),
                                    labels), "float32")
            return loss, tf.reduce_sum(hits * weights), tf.reduce_sum(weights)

        replica_eval = self._compiled(replica_eval)

        @tf.function
        def eval_step(batch):
            results = strategy.run(replica_eval, args=batch)
            return [strategy.reduce("SUM", r, axis=None) for r in results]

        return eval_step

    def evaluate(self, split="test"):
        """Loss and accuracy on every example of 'test' or 'validation'.

        'test' is the data set's evaluation split (keys eval_loss and
        eval_accuracy); 'validation' the examples held out of the training
        split by task.validation_examples (validation_loss, ...). The split
        is read in batches of one static shape, the last one padded; the
        padding is masked out of the sums.
        """
        if split == "validation":
            if self.validation_indices is None:
                raise TrainerError(
                    "Evaluating on 'validation' needs held-out examples; set "
                    "task.validation_examples (e.g. 5000).")
            source, indices = self.info.train_split, self.validation_indices
            expected, prefix = len(indices), "validation"
        elif split == "test":
            source, indices = self.info.eval_split, None
            expected = self._data.num_examples(
                self.config["task"]["dataset"], source, self.data_dir)
            prefix = "eval"
        else:
            raise ValueError(f"split must be 'test' or 'validation', got "
                             f"{split!r}.")
        start = time.time()
        if self._eval_step is None:
            self._eval_step = self._make_eval_step()
        if split not in self._eval_datasets:
            # Kept for the run: data held in memory caches its preprocessed
            # batches on the first pass, so later evaluations read no data.
            self._eval_datasets[split] = self._distributed(
                source, False, 0, self.config["train"]["eval_batch_size"],
                indices=indices)
        totals = None
        try:
            for batch in self._eval_datasets[split]:
                # Summed in float64 on the host's device, as Python floats
                # were, without a read back per batch.
                sums = [self._tf.cast(v, "float64")
                        for v in self._eval_step(batch)]
                totals = sums if totals is None else [
                    t + v for t, v in zip(totals, sums)]
        except self._tf.errors.DataLossError as error:
            raise self._corrupt_data(error) from None
        # One read back per evaluation, not one per batch.
        loss, correct, count = (float(t) for t in totals)
        self._epoch_seconds["evaluation"] += time.time() - start
        if count != expected:
            raise TrainerError(
                f"Evaluated {int(count)} examples but the {split} split has "
                f"{expected}; the data set is incomplete.")
        return {f"{prefix}_loss": loss / count,
                f"{prefix}_accuracy": correct / count}

    def _batch_norm_statistics(self):
        """(layer, moving_mean, moving_variance) of every batch norm."""
        import keras

        return [(layer, layer.moving_mean, layer.moving_variance)
                for layer in self.model._flatten_layers()
                if isinstance(layer, keras.layers.BatchNormalization)]

    def recompute_batch_norm_statistics(self, num_examples):
        """Sets the moving statistics to their exact average over examples.

        `num_examples` training examples (augmented, from a stream seeded
        with train.seed + 2, the same examples at every evaluation) go
        through the model in training mode in batches of
        min(num_examples, train.global_batch_size); nothing else changes.
        Each moving mean becomes the average of the batch means of the
        layer's input, each moving variance the average of the batch
        variances (what training-mode normalisation divides by), all batches
        and replicas weighted equally: a cumulative average, not an
        exponential one, so the statistics describe the current weights
        rather than a trail of past ones.

        Returns:
            The previous values, for `restore_batch_norm_statistics`.
        """
        tf = self._tf
        layers = self._batch_norm_statistics()
        saved = [(mean.numpy(), variance.numpy())
                 for _, mean, variance in layers]
        if not layers:
            return saved
        start = time.time()
        batch = min(num_examples, self.global_batch)
        tracked = [v for _, mean, variance in layers for v in (mean, variance)]
        if num_examples not in self._batch_norm_passes:
            self._batch_norm_passes[num_examples] = (
                self._distributed(self.info.train_split, True,
                                  self.config["train"]["seed"] + 2, batch,
                                  repeat=True, indices=self.training_indices),
                self._make_batch_moments(tracked))
        dataset, batch_moments = self._batch_norm_passes[num_examples]
        momenta = [layer.momentum for layer, _, _ in layers]
        totals = [tf.zeros(v.shape, "float32") for v in tracked]
        batches = num_examples // batch
        # Reset first: non-finite old statistics must not leak (0 * nan).
        for _, mean, variance in layers:
            mean.assign(tf.zeros(mean.shape, mean.dtype))
            variance.assign(tf.ones(variance.shape, variance.dtype))
        try:
            # Read when batch_moments is traced, which happens below (on
            # the first recomputation: later ones reuse the trace).
            for layer, _, _ in layers:
                layer.momentum = 0.0
            iterator = iter(dataset)
            for _ in range(batches):
                totals = [t + m for t, m in
                          zip(totals, batch_moments(next(iterator)))]
        finally:
            for (layer, _, _), momentum in zip(layers, momenta):
                layer.momentum = momentum
        for variable, total in zip(tracked, totals):
            variable.assign(tf.cast(total / batches, variable.dtype))
        self._epoch_seconds["batch_norm"] += time.time() - start
        return saved

    def _make_batch_moments(self, tracked):
        """Each batch norm's batch mean and variance of a batch, replica
        means, as a compiled function of a distributed batch."""
        import keras

        tf, strategy = self._tf, self.strategy

        def replica_fn(images, labels):
            del labels
            # With momentum 0, the state a training-mode pass would write is
            # exactly the batch's mean and variance; it is collected, never
            # assigned.
            with keras.StatelessScope() as scope:
                self.model(images, training=True)
            return [tf.cast(scope.get_current_value(v), "float32")
                    for v in tracked]

        @tf.function
        def batch_moments(batch):
            moments = strategy.run(replica_fn, args=batch)
            return strategy.reduce("MEAN", moments, axis=None)

        return batch_moments

    def restore_batch_norm_statistics(self, saved):
        for (_, mean, variance), (mean_value, variance_value) in zip(
                self._batch_norm_statistics(), saved):
            mean.assign(mean_value)
            variance.assign(variance_value)

    def evaluate_splits(self):
        """Every split of train.eval_splits, on recomputed statistics if set.

        With train.recompute_bn_examples, the moving statistics are
        recomputed for the evaluation and then put back: the checkpointed
        training state, and so a resumed run, is identical with and without
        the option (which costs one copy of the statistics, small next to
        the weights).
        """
        train = self.config["train"]
        saved = None
        if train["recompute_bn_examples"]:
            saved = self.recompute_batch_norm_statistics(
                train["recompute_bn_examples"])
        try:
            results = {}
            for split in train["eval_splits"].split("+"):
                results.update(self.evaluate(split))
        finally:
            if saved is not None:
                self.restore_batch_norm_statistics(saved)
        return results

    def _make_diagnostics(self):
        """Per-layer trust ratios and gradient-noise ratios a_l / ||g_l||.

        The estimates come from the estimator that trains, fresh on every
        probe; the loop's when training uses none (LARS, SGD).
        """
        tf, strategy = self._tf, self.strategy
        estimator = (self.estimator or self._clars_tf.estimator_from_config(
            dict(self.config["estimator"], method="loop"))).every_step()
        variables = self.model.trainable_variables

        def replica_fn(images, labels):
            # Deferred and never applied: diagnostics leave the batch-norm
            # moving statistics as training left them.
            out = self._clars_tf.compute_loss_gradients_and_norms(
                self.model, self.loss_fn, images, labels,
                global_batch_size=self.global_batch, estimator=estimator,
                defer_state_updates=True)
            return out.gradients, out.gradient_norms

        @tf.function
        def diagnostics(batch):
            gradients, estimates = strategy.run(replica_fn, args=batch)
            gradients = strategy.reduce("SUM", gradients, axis=None)
            estimates = strategy.reduce("MEAN", estimates, axis=None)
            norms = [self._clars_tf.layerwise.float32_norm(g)
                     for g in gradients]
            if hasattr(self.update_optimizer, "trust_ratios"):
                uses_estimate = isinstance(self.update_optimizer,
                                           self._clars_tf.CLARS)
                trust = self.update_optimizer.trust_ratios(
                    variables, estimates if uses_estimate else norms)
            else:
                trust = [tf.ones(())] * len(variables)
            noise = [a / tf.maximum(n, 1e-12)
                     for a, n in zip(estimates, norms)]
            weight_norms = [self._clars_tf.layerwise.float32_norm(v)
                            for v in variables]
            return trust, noise, weight_norms, estimates, norms

        return diagnostics

    def _corrupt_data(self, error):
        name = self.config["task"]["dataset"]
        return TrainerError(
            f"The {name} data files are corrupt or truncated "
            f"({error.message.splitlines()[0]}). Delete the {name} folder "
            f"under --data_dir ({self.data_dir or '~/tensorflow_datasets'}) "
            "and rerun to prepare it again.")

    # The loop --------------------------------------------------------------

    def _load_history(self, step):
        if not os.path.exists(self._results_path):
            return []
        with open(self._results_path, encoding="utf-8") as f:
            history = json.load(f).get("epochs", [])
        return [entry for entry in history if entry["step"] <= step]

    def _keep_logs_up_to(self, step):
        """Drops the step logs' lines past `step`, the checkpoint resumed from.

        A run killed after logging steps it had not checkpointed redoes
        them when resumed: their lines in steps.jsonl and diagnostics.jsonl
        are written again, once each, as results.json keeps one entry per
        epoch.
        """
        if not self.is_chief:
            return
        for path in (self._steps_path, self._diagnostics_path):
            if not os.path.exists(path):
                continue
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f
                        if line.strip() and json.loads(line)["step"] <= step]
            staging = path + ".partial"
            with open(staging, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(staging, path)

    def _log_step(self, record):
        if self.is_chief:
            with open(self._steps_path, "a", encoding="utf-8") as f:
                f.write(_strict_json(record) + "\n")

    def _save_results(self, history, final=None):
        if not self.is_chief:
            return
        _write_json_atomically(self._results_path, {
            "config": self.config,
            "strategy": self.strategy_name,
            "num_replicas": self.replicas,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": history,
            "final": final,
        })

    def restore(self, required=False):
        latest = self.checkpoints.latest_checkpoint
        if latest is None and self.is_chief is False:
            latest = self._tf.train.latest_checkpoint(
                os.path.join(self.model_dir, "checkpoints"))
        if latest is None:
            if required:
                raise TrainerError(
                    f"No checkpoint in {self.model_dir}/checkpoints to "
                    "evaluate or export; train first (--mode=train).")
            return 0
        try:
            # Every saved value must find its variable and every variable
            # its value: a checkpoint of another model or optimizer fails.
            self.checkpoint.restore(latest).assert_consumed()
        except (AssertionError, ValueError,
                self._tf.errors.OpError) as error:
            raise TrainerError(
                f"Checkpoint {latest} does not match this config's model and "
                f"optimizer ({self.config['model']['name']}, "
                f"{self.config['optimizer']['name']}): {error}. Use the "
                "config it was trained with, or a fresh --model_dir."
            ) from None
        return int(self.optimizer.iterations.numpy())

    def train(self):
        tf = self._tf
        train = self.config["train"]
        self._epoch_began = (time.time(), time.process_time())
        step = self.restore()
        history = self._load_history(step)
        if step >= self.last_step:
            _console(f"Already trained to step {step}.")
            return history
        self._keep_logs_up_to(step)
        iterator = None
        if self._train_loop is None:
            self._train_loop = self._make_train_loop()
        train_loop = self._train_loop
        if self._write_summaries is None:
            self._write_summaries = self._make_summary_writer()
        write_summaries = self._write_summaries
        diagnostics = None
        probe = None
        if train["diagnostics_every_steps"]:
            diagnostics = self._make_diagnostics()
            probe = iter(self._distributed(self.info.train_split, True,
                                           train["seed"] + 1,
                                           self.global_batch, repeat=True,
                                           indices=self.training_indices))
        paths = [v.path for v in self.model.trainable_variables]
        _console(f"Training {self.config['model']['name']} with "
                 f"{self.config['optimizer']['name']} on {self.replicas} "
                 f"replica(s), steps {step}..{self.last_step}.")
        # The first interval after a (re)start includes tracing: the ETA
        # uses the intervals after it.
        timed_steps, timed_seconds, first_interval = 0, 0.0, True
        while step < self.last_step:
            epoch_end = (step // self.steps_per_epoch + 1) * self.steps_per_epoch
            if iterator is None or (step % self.steps_per_epoch == 0
                                    and not self._iterator_spans_run):
                iterator = self._train_iterator(step)
            steps = min(train["steps_per_loop"], self.last_step - step,
                        epoch_end - step)
            start = time.time()
            try:
                outputs = train_loop(iterator, tf.constant(steps))
            except tf.errors.DataLossError as error:
                raise self._corrupt_data(error) from None
            except tf.errors.InvalidArgumentError as error:
                raise TrainerError(
                    f"Training failed between steps {step} and "
                    f"{step + steps}: {error.message.splitlines()[0]}"
                ) from None
            loss_sum, correct, bad_step, bad_code, skipped, rate = (
                float(outputs[0]), float(outputs[1]), int(outputs[2]),
                int(outputs[3]), int(outputs[4]), float(outputs[5]))
            seconds = time.time() - start
            self._epoch_seconds["training"] += seconds
            if bad_code and train["on_nonfinite"] == "stop" and not (
                    self.loss_scaled):
                raise TrainerError(
                    f"Non-finite gradient or gradient-norm estimate at step "
                    f"{step + bad_step + 1}, first in variable "
                    f"'{paths[len(paths) - bad_code]}'; the update was not "
                    "applied and the last good checkpoint is kept. Lower the "
                    "learning rate, or set train.on_nonfinite=skip.")
            if skipped:
                logging.warning(
                    "Skipped %d step(s) with non-finite values, first at step "
                    "%d in '%s'.", skipped, step + bad_step + 1,
                    paths[len(paths) - bad_code])
            applied = steps - skipped
            step += steps
            self.epoch_sums.assign_add(np.array(
                [loss_sum, correct, applied * self.global_batch], "float64"))
            images_per_second = steps * self.global_batch / seconds
            loss = loss_sum / max(applied, 1)
            accuracy = correct / max(applied * self.global_batch, 1)
            write_summaries(step, loss=loss, skipped_steps=skipped,
                            accuracy=accuracy, learning_rate=rate,
                            images_per_second=images_per_second)
            with self.train_writer.as_default(step=step):
                if diagnostics and step % train["diagnostics_every_steps"] < (
                        steps):
                    self._log_diagnostics(diagnostics(next(probe)), paths,
                                          step)
            if not first_interval:
                timed_steps += steps
                timed_seconds += seconds
            first_interval = False
            seconds_per_step = (timed_seconds / timed_steps if timed_steps
                                else seconds / steps)
            _console(
                f"step {step}/{self.last_step} epoch "
                f"{step / self.steps_per_epoch:.2f} loss {loss:.4f} accuracy "
                f"{accuracy:.4f} lr {rate:.4g} {images_per_second:.0f} "
                "images/s ETA "
                f"{_duration((self.last_step - step) * seconds_per_step)}")
            # The machine-readable twin of the console line: the mean loss
            # and accuracy over the steps since the last line.
            self._log_step({"step": step,
                            "epoch": step / self.steps_per_epoch,
                            "loss": loss, "accuracy": accuracy,
                            "learning_rate": rate, "skipped_steps": skipped,
                            "images_per_second": images_per_second})
            at_epoch_end = step == epoch_end
            if (step % train["checkpoint_every_steps"] < steps
                    or step == self.last_step or at_epoch_end):
                if at_epoch_end or step == self.last_step:
                    history = self._end_epoch(history, step, rate,
                                              images_per_second)
                self.checkpoints.save(checkpoint_number=step)
                self._save_results(history)
        return history

    def _end_epoch(self, history, step, rate, images_per_second):
        loss_sum, correct, count = self.epoch_sums.numpy()
        epoch = -(-step // self.steps_per_epoch)
        steps = count / self.global_batch
        entry = {"epoch": epoch, "step": step,
                 "train_loss": float(loss_sum / steps) if count else None,
                 "train_accuracy": float(correct / count) if count else None,
                 "learning_rate": rate,
                 "images_per_second": images_per_second}
        every = self.config["train"]["eval_every_epochs"]
        evaluation = None
        if epoch % every == 0 or step == self.last_step:
            evaluation = self.evaluate_splits()
            entry.update(evaluation)
            with self.eval_writer.as_default(step=step):
                for key, value in evaluation.items():
                    # eval_* keep their historical names loss and accuracy.
                    self._tf.summary.scalar(key.removeprefix("eval_"), value)
        now = (time.time(), time.process_time())
        # The whole epoch: its parts above plus what lies between them
        # (checkpoints, logs, console lines) and, in the first epoch after a
        # (re)start, the restore, the input pipeline's set-up and tracing.
        # Its CPU seconds (every thread of this process) say what it cost
        # where other processes share the machine and wall time swings.
        total, total_cpu = (end - began for end, began
                            in zip(now, self._epoch_began))
        self._epoch_began = now
        if evaluation is not None:
            _console(f"epoch {epoch} " + "; ".join(
                f"{prefix} loss {evaluation[prefix + '_loss']:.4f} accuracy "
                f"{evaluation[prefix + '_accuracy']:.4f}"
                for prefix in ("validation", "eval")
                if prefix + "_loss" in evaluation) + " (" + ", ".join(
                    f"{name.replace('_', ' ')} {seconds:.1f}s"
                    for name, seconds in self._epoch_seconds.items()
                    if seconds) + f"; epoch {total:.1f}s)")
        # Timings, not results: experiments.rerun_check leaves them out.
        entry["seconds"] = {name: round(seconds, 3) for name, seconds
                            in self._epoch_seconds.items()}
        entry["seconds"].update(total=round(total, 3),
                                total_cpu=round(total_cpu, 3))
        self._epoch_seconds = dict.fromkeys(self._epoch_seconds, 0.0)
        # A run stopped by train.max_steps mid-epoch reports the epoch so
        # far and keeps its sums (checkpointed): extended later, the run
        # replaces that entry with the whole epoch's, one entry per epoch.
        if step % self.steps_per_epoch == 0:
            self.epoch_sums.assign([0.0, 0.0, 0.0])
        return [past for past in history if past["epoch"] != epoch] + [entry]

    def _log_diagnostics(self, outputs, paths, step):
        tf = self._tf
        records = {}
        for path, t, n, w, a, g in zip(paths, *outputs):
            tf.summary.scalar(f"trust_ratio/{path}", t)
            tf.summary.scalar(f"noise_ratio/{path}", n)
            # The norms let a reader form unclipped ratios (eta ||w|| / a_l).
            records[path] = {"trust_ratio": float(t), "noise_ratio": float(n),
                             "weight_norm": float(w), "estimate": float(a),
                             "gradient_norm": float(g)}
        if self.is_chief:
            with open(self._diagnostics_path, "a", encoding="utf-8") as f:
                f.write(_strict_json({"step": step, "layers": records}) + "\n")

    def export(self, export_dir):
        from clars_tf.trainers import builders
        from clars_tf.trainers import export as export_lib

        # A single-device copy: the SavedModel must not depend on the
        # training strategy's devices.
        serving_model = builders.model(self.config)
        serving_model.set_weights(self.model.get_weights())
        return export_lib.export(serving_model,
                                 self.config["task"]["dataset"],
                                 self.config["task"]["image_size"],
                                 export_dir)


def run(config, mode, model_dir, data_dir, strategy_name, tpu, export_dir):
    """Runs `mode`; returns the results dict written to results.json."""
    from clars_tf.trainers import config as config_lib
    from clars_tf.trainers import data
    from clars_tf.trainers import distribution
    from clars_tf.trainers import export as export_lib

    export_dir = export_dir or os.path.join(model_dir, "export")
    if mode in ("train_and_eval", "export"):
        export_lib.check_destination(export_dir)
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise TrainerError(
            f"--model_dir={model_dir} exists and is a file; pass a directory.")
    strategy = distribution.create(strategy_name, tpu)
    if (config["train"]["jit_compile"] and strategy.num_replicas_in_sync > 1
            and strategy_name != "tpu" and not distribution.has_gpus()):
        # Measured: XLA fails to compile the cross-replica train step there.
        raise TrainerError(
            f"train.jit_compile=true cannot run --strategy={strategy_name} "
            f"over {strategy.num_replicas_in_sync} CPU replicas: XLA does not "
            "compile the cross-replica step on CPU devices. Set "
            "train.jit_compile=false, or use GPUs or a single CPU device.")
    estimator = config_lib.check_against_strategy(
        config, strategy.num_replicas_in_sync)
    trainer_name = "chief" if distribution.is_chief(strategy) else (
        f"worker-{distribution.task_id(strategy)}")
    lock = ModelDirLock(model_dir, trainer_name)
    data.prepare(config["task"]["dataset"], data_dir)
    trainer = Trainer(config, strategy, model_dir, data_dir, strategy_name,
                      estimator)
    results = {"model_dir": model_dir}
    if mode in ("train", "train_and_eval"):
        history = trainer.train()
        results["epochs"] = history
    else:
        trainer.restore(required=True)
    if mode in ("eval", "train_and_eval"):
        step = int(trainer.optimizer.iterations.numpy())
        history = results.get("epochs") or trainer._load_history(step)
        last = history[-1] if history else {}
        keys = [f"{'eval' if split == 'test' else split}_{metric}"
                for split in config["train"]["eval_splits"].split("+")
                for metric in ("loss", "accuracy")]
        if last.get("step") == step and all(k in last for k in keys):
            final = {k: last[k] for k in keys}
        else:
            final = trainer.evaluate_splits()
        final["step"] = step
        results["final"] = final
        trainer._save_results(history, final)
    if mode in ("train_and_eval", "export") and trainer.is_chief:
        results["export_dir"] = trainer.export(export_dir)
    del lock
    return results


def main(argv):
    del argv
    if not FLAGS.model_dir:
        raise app.UsageError("--model_dir is required.")
    _quiet_unless_verbose()
    from clars_tf.trainers import config as config_lib
    from clars_tf.trainers import distribution

    try:
        distribution.split_cpu(FLAGS.cpu_devices)
        config = config_lib.build_config(FLAGS.config_file,
                                         FLAGS.params_override)
        results = run(config, FLAGS.mode, FLAGS.model_dir, FLAGS.data_dir,
                      FLAGS.strategy, FLAGS.tpu, FLAGS.export_dir)
    except (config_lib.ConfigError, TrainerError,
            distribution.StrategyError) as error:
        sys.exit(f"error: {error}")
    except USER_ERRORS as error:
        sys.exit(f"error: {type(error).__name__}: {error}")
    print(json.dumps({k: results[k] for k in ("model_dir", "final",
                                              "export_dir") if k in results},
                     indent=2))


_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort")


def _print_help():
    """The usage and this trainer's own flags (absl's --help would list
    the flags of the command's script, which has none)."""
    print(__doc__.strip())
    print("\nFlags:")
    print(FLAGS.module_help(sys.modules[__name__]))
    print("  --verbosity: absl log level; any value brings TensorFlow's, "
          "absl's and tfds's\n    INFO lines back (e.g. --verbosity=0).")
    print("  --helpfull: every flag, TensorFlow's and absl's included.")


def console_main():
    """The `clars-train` command: the same flags as `python3 -m trainers.train`."""
    if any(arg in _HELP_FLAGS for arg in sys.argv[1:]):
        _print_help()
        sys.exit(0)
    app.run(main)


if __name__ == "__main__":
    console_main()
