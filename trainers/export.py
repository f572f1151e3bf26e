"""SavedModel export: raw uint8 images in, class probabilities out.

The export is written next to its destination and renamed into place, so an
export interrupted half-way never replaces a good earlier one.
"""

import glob
import os
import shutil

import tensorflow as tf

from clars_tf.trainers import data


class ExportError(ValueError):
    """The export destination cannot be used; the message says why."""


class _Serving(tf.Module):
    def __init__(self, model, dataset, image_size):
        super().__init__()
        self.model = model
        self._dataset = dataset
        self._image_size = image_size

    def serve(self, images):
        expected = data.DATASETS[self._dataset].image_shape
        shape = tf.shape(images)
        checks = [
            tf.debugging.assert_equal(
                shape[axis + 1], size,
                message=f"images must be uint8 [N, {expected[0] or 'H'}, "
                        f"{expected[1] or 'W'}, {expected[2]}] for this "
                        f"{self._dataset} model")
            for axis, size in enumerate(expected) if size is not None]
        with tf.control_dependencies(checks):
            images = tf.identity(images)
        inputs = data.preprocess_for_serving(images, self._dataset,
                                             self._image_size)
        logits = self.model(inputs, training=False)
        return {"probabilities": tf.nn.softmax(tf.cast(logits, "float32"))}


def check_destination(export_dir):
    """Rejects a destination that is a file before any training happens.

    Also puts back an earlier export that a crash left moved aside between
    the two renames of `export`.
    """
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ExportError(
            f"Export directory '{export_dir}' exists and is a file; remove it "
            "or pass another --export_dir.")
    moved_aside = sorted(glob.glob(f"{glob.escape(export_dir)}.previous-*"))
    if moved_aside and not os.path.exists(export_dir):
        os.rename(moved_aside[-1], export_dir)


def export(model, dataset, image_size, export_dir):
    """Saves a serving SavedModel of `model` at `export_dir`, atomically.

    Args:
        model: a Keras model taking preprocessed float images.
        dataset: the data set name (decides preprocessing and input shape).
        image_size: the model's input size.
        export_dir: destination directory; an existing export is replaced
            only once the new one is complete.

    Returns:
        `export_dir`.
    """
    check_destination(export_dir)
    height, width, channels = data.DATASETS[dataset].image_shape
    module = _Serving(model, dataset, image_size)
    serve = tf.function(
        module.serve,
        input_signature=[tf.TensorSpec([None, height, width, channels],
                                       tf.uint8, name="images")])
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    staging = f"{export_dir}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tf.saved_model.save(module, staging,
                            signatures={"serving_default": serve})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = f"{export_dir}.previous-{os.getpid()}"
    if os.path.isdir(export_dir):
        os.rename(export_dir, previous)
    os.rename(staging, export_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return export_dir
