"""Turns a config into the model, loss, schedule and optimizer."""

import keras
import tensorflow as tf

import clars_tf
from clars_tf import models
from clars_tf import schedules
from clars_tf.trainers import data


def model(config):
    """The config's model for the config's data set, freshly initialised."""
    task, spec = config["task"], config["model"]
    info = data.DATASETS[task["dataset"]]
    size = task["image_size"]
    return models.build_model(
        spec["name"], (size, size, info.image_shape[-1]), info.num_classes,
        use_sync_bn=spec["use_sync_bn"], **spec["options"])


def per_example_loss(num_classes, label_smoothing):
    """Cross-entropy from logits, one value per example."""

    def loss(labels, logits):
        # float32 at least (float16 logits), float64 when the model is.
        if logits.dtype != tf.float64:
            logits = tf.cast(logits, "float32")
        if label_smoothing:
            one_hot = tf.one_hot(tf.cast(labels, "int32"), num_classes,
                                 dtype=logits.dtype)
            return keras.losses.categorical_crossentropy(
                one_hot, logits, from_logits=True,
                label_smoothing=label_smoothing)
        return keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True)

    return loss


def learning_rate(config, steps_per_epoch):
    """Linear scaling, optional warmup to the peak, decay to the end."""
    opt, train = config["optimizer"], config["train"]
    peak = schedules.linear_scaling(opt["base_learning_rate"],
                                    train["global_batch_size"],
                                    opt["reference_batch_size"])
    return schedules.build_schedule(
        peak, total_steps=train["epochs"] * steps_per_epoch,
        decay=opt["decay"],
        warmup_steps=round(opt["warmup_epochs"] * steps_per_epoch),
        end_learning_rate=opt["end_learning_rate"], power=opt["power"])


def optimizer(config, steps_per_epoch):
    """The config's optimizer, wrapped for loss scaling under float16.

    SGD's coupled L2 term is not part of Keras's SGD (its `weight_decay` is
    decoupled); the trainer adds it to the gradients (`sgd_decay_rate`).
    """
    opt = config["optimizer"]
    rate = learning_rate(config, steps_per_epoch)
    name = opt["name"]
    shared = dict(
        momentum=opt["momentum"], nesterov=opt["nesterov"],
        weight_decay_rate=opt["weight_decay_rate"],
        exclude_from_layer_adaptation=opt["exclude_from_layer_adaptation"])
    if name == "clars":
        result = clars_tf.CLARS(rate, **shared, **config["clars"])
    elif name == "lars":
        result = clars_tf.LARS(rate, **shared, **config["lars"])
    elif name == "sgd":
        result = keras.optimizers.SGD(rate, momentum=opt["momentum"],
                                      nesterov=opt["nesterov"])
    else:
        result = keras.optimizers.Lamb(
            rate, weight_decay=opt["weight_decay_rate"] or None)
    if config["train"]["precision"] == "mixed_float16":
        result = keras.optimizers.LossScaleOptimizer(result)
    return result


def sgd_decay_rate(config):
    opt = config["optimizer"]
    return opt["weight_decay_rate"] if opt["name"] == "sgd" else 0.0
