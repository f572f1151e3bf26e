"""Input pipeline: offline Fashion-MNIST through tfds, determinism, serving."""

import collections
import gzip
import os
import shutil
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from clars_tf.trainers import data

_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tfds data_dir with fashion_mnist prepared once for this module."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("fashion_mnist", data_dir)
    return data_dir


def _first_batches(data_dir, seed):
    dataset = data.build_dataset(
        "fashion_mnist", "train[:10000]", data_dir=data_dir,
        global_batch_size=64, is_training=True, image_size=32, seed=seed)
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(2)]


def _corrupt_copy(tmp_path, filename, content):
    source = tmp_path / "source"
    source.mkdir()
    for name in _IDX_FILES:
        shutil.copy(os.path.join(data.DEBIAN_FASHION_MNIST_DIR, name), source)
    if content is None:
        (source / filename).unlink()
    else:
        (source / filename).write_bytes(content)
    return str(source)


def test_fashion_mnist_prepared_through_tfds(data_dir):
    builder = data.prepare("fashion_mnist", data_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 60_000
    assert builder.info.splits["test"].num_examples == 10_000
    assert builder.info.features["image"].shape == (28, 28, 1)
    labels = np.concatenate([
        y for _, y in tfds.as_numpy(builder.as_dataset(
            split="test", as_supervised=True, batch_size=10_000))])
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == [1000] * 10
    # Only the prepared data set is left behind, no staging files: the
    # empty lock file that serialises preparation stays.
    assert sorted(os.listdir(data_dir)) == ["downloads", "fashion_mnist"]
    assert os.listdir(os.path.join(data_dir, "downloads")) == [
        "fashion_mnist.prepare.lock"]


def test_upstream_files_are_accepted_as_they_are(tmp_path):
    # A machine with the original downloads (gzip header intact) must get
    # the same bytes back as one with Debian's normalised copies.
    url_infos = tfds.builder_cls("fashion_mnist").url_infos
    url_info = next(info for info in url_infos.values()
                    if info.filename == "t10k-labels-idx1-ubyte.gz")
    upstream = data._restore_upstream_file(
        os.path.join(data.DEBIAN_FASHION_MNIST_DIR, url_info.filename),
        url_info)
    (tmp_path / url_info.filename).write_bytes(upstream)
    assert data._restore_upstream_file(
        str(tmp_path / url_info.filename), url_info) == upstream


def test_training_batches_depend_only_on_seed(data_dir):
    first = _first_batches(data_dir, seed=7)
    again = _first_batches(data_dir, seed=7)
    other = _first_batches(data_dir, seed=8)
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(first[0][0], other[0][0])
    images, labels = first[0]
    assert images.shape == (64, 32, 32, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32


def test_eval_sharding_gives_disjoint_halves(data_dir):
    def image_keys(input_context=None):
        dataset = data.build_dataset(
            "fashion_mnist", "test", data_dir=data_dir,
            global_batch_size=1000, is_training=False, image_size=28, seed=0,
            input_context=input_context)
        return collections.Counter(
            image.tobytes() + bytes([label])
            for x, y, w in dataset
            for image, label, weight in zip(x.numpy(), y.numpy(), w.numpy())
            if weight)

    halves = [
        image_keys(tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=i,
            num_replicas_in_sync=2))
        for i in range(2)]
    assert sum(halves[0].values()) == sum(halves[1].values()) == 5000
    assert halves[0] + halves[1] == image_keys()


@pytest.mark.parametrize("filename, damage", [
    ("t10k-labels-idx1-ubyte.gz", "truncated"),
    ("train-labels-idx1-ubyte.gz", "missing"),
    ("t10k-labels-idx1-ubyte.gz", "bad_magic"),
    ("t10k-labels-idx1-ubyte.gz", "other_content"),
])
def test_damaged_idx_file_raises_data_error(tmp_path, filename, damage):
    original = open(os.path.join(data.DEBIAN_FASHION_MNIST_DIR, filename),
                    "rb").read()
    labels = gzip.decompress(original)
    content = {
        "truncated": original[:len(original) // 2],
        "missing": None,
        "bad_magic": gzip.compress(b"\x00\x00\x08\x03" + labels[4:]),
        "other_content": gzip.compress(labels[:8] + bytes(len(labels) - 8)),
    }[damage]
    source = _corrupt_copy(tmp_path, filename, content)
    data_dir = tmp_path / "tfds"
    with pytest.raises(data.DataError, match=filename) as error:
        data.prepare("fashion_mnist", str(data_dir), fashion_mnist_dir=source)
    assert "apt-get install" in str(error.value)
    assert not tfds.builder("fashion_mnist",
                            data_dir=str(data_dir)).is_prepared()


def test_concurrent_prepare_prepares_once(tmp_path, monkeypatch):
    """Two trainers starting together on a fresh machine prepare once.

    Without the lock both saw an unprepared data set and the second
    failed renaming tfds's finished folder over the first's.
    """
    prepared = tmp_path / "fashion_mnist_prepared"
    active, calls = [], []

    class Builder:
        def is_prepared(self):
            return prepared.exists()

    def slow_prepare(builder, data_dir, source_dir):
        active.append(1)
        calls.append(len(active))
        time.sleep(0.3)
        prepared.touch()
        active.pop()

    monkeypatch.setattr(data.tfds, "builder", lambda *args, **kwargs: Builder())
    monkeypatch.setattr(data, "_prepare_fashion_mnist", slow_prepare)
    threads = [threading.Thread(target=data.prepare,
                                args=("fashion_mnist", str(tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1]


def test_a_remote_data_dir_is_kept_as_a_url_and_prepared_without_a_lock(
        tmp_path, monkeypatch):
    """gs:// used to become <cwd>/gs:/..., a local folder, on Cloud TPU."""
    monkeypatch.chdir(tmp_path)
    seen = []

    class Builder:
        def is_prepared(self):
            return False

    monkeypatch.setattr(data.tfds, "builder",
                        lambda name, data_dir: Builder())
    monkeypatch.setattr(data, "_download_and_prepare",
                        lambda builder, name, data_dir: seen.append(data_dir))
    data.prepare("cifar10", "gs://bucket/tensorflow_datasets")
    assert seen == ["gs://bucket/tensorflow_datasets"]
    assert data._split_location("cifar10", "gs://b/t") == "gs://b/t"
    assert list(tmp_path.iterdir()) == []


def test_download_failures_raise_data_error(tmp_path, monkeypatch):
    def unreachable(address, timeout):
        raise OSError(f"no route to {address[0]}")

    # Simulated offline, so a connected machine downloads nothing either.
    monkeypatch.setattr(urllib.request, "getproxies", dict)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(data.DataError, match="cifar-10-binary.tar.gz into"):
        data.prepare("cifar10", str(tmp_path))
    with pytest.raises(data.DataError, match="ILSVRC2012_img_train.tar"):
        data.prepare("imagenet2012", str(tmp_path))


def test_serving_matches_eval_pipeline(data_dir):
    builder = data.prepare("fashion_mnist", data_dir)
    raw, _ = next(iter(builder.as_dataset(
        split="test", as_supervised=True, batch_size=100)))
    for image_size in (28, 36):
        served = data.preprocess_for_serving(raw, "fashion_mnist", image_size)
        evaluated, _, _ = next(iter(data.build_dataset(
            "fashion_mnist", "test", data_dir=data_dir, global_batch_size=100,
            is_training=False, image_size=image_size, seed=0)))
        assert served.shape == (100, image_size, image_size, 1)
        np.testing.assert_allclose(served, evaluated, rtol=0, atol=1e-5)


def test_imagenet_preprocessing_on_synthetic_images():
    images = tf.random.stateless_uniform(
        [2, 120, 90, 3], seed=[1, 2], maxval=256, dtype=tf.int32)
    images = tf.cast(images, tf.uint8)
    served = data.preprocess_for_serving(images, "imagenet2012", 64)
    assert served.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(
        served[1], data.preprocess_for_serving(images[1:], "imagenet2012",
                                               64)[0], atol=1e-5)

    jpeg = tf.io.encode_jpeg(images[0])
    crop = [data._imagenet_train_image(jpeg, tf.constant([3, s], tf.int64),
                                       64) for s in (0, 0, 1)]
    assert crop[0].shape == (64, 64, 3)
    np.testing.assert_array_equal(crop[0], crop[1])
    assert not np.array_equal(crop[0], crop[2])


def test_normalisation_zero_mean_unit_std_on_train_set(data_dir):
    dataset = data.build_dataset(
        "fashion_mnist", "train", data_dir=data_dir, global_batch_size=2000,
        is_training=False, image_size=28, seed=0)
    total, total_sq, count = 0.0, 0.0, 0
    for images, _, weights in dataset:
        assert np.all(weights.numpy() == 1.0)  # 2000 divides the split
        images = images.numpy().astype(np.float64)
        total += images.sum()
        total_sq += np.square(images).sum()
        count += images.size
    mean = total / count
    assert abs(mean) < 0.01
    assert abs(np.sqrt(total_sq / count - mean**2) - 1.0) < 0.01


def test_argument_validation():
    with pytest.raises(ValueError, match="name: .*Did you mean 'cifar10'"):
        data.steps_per_epoch("cifar_10", 128)
    with pytest.raises(ValueError, match="global_batch_size"):
        data.steps_per_epoch("fashion_mnist", 0)
    with pytest.raises(ValueError, match="image_size"):
        data.preprocess_for_serving(
            tf.zeros([1, 28, 28, 1], tf.uint8), "fashion_mnist", 0)
    with pytest.raises(ValueError, match="images_uint8"):
        data.preprocess_for_serving(
            tf.zeros([1, 28, 28, 1]), "fashion_mnist", 28)
    assert data.steps_per_epoch("fashion_mnist", 512) == 117
    for spec in data.DATASETS.values():
        assert spec.preprocessing in ("imagenet", "small", "none")
        assert len(spec.mean) == len(spec.std) == spec.image_shape[-1]


def test_build_dataset_rejects_bad_arguments(data_dir):
    common = dict(data_dir=data_dir, is_training=False, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        data.build_dataset("fashion_mnist", "test", global_batch_size=8,
                           image_size=0, **common)
    with pytest.raises(ValueError, match="global_batch_size"):
        data.build_dataset("fashion_mnist", "test", global_batch_size=0,
                           image_size=28, **common)
    with pytest.raises(ValueError, match="split: 'validation'"):
        data.build_dataset("fashion_mnist", "validation", global_batch_size=8,
                           image_size=28, **common)


def test_synthetic_labels_are_the_brightest_band():
    images, labels, _ = next(iter(data.build_dataset(
        "synthetic", "test", data_dir=None, global_batch_size=64,
        is_training=False, image_size=32, seed=0)))
    spec = data.DATASETS["synthetic"]
    raw = images.numpy() * np.array(spec.std) + np.array(spec.mean)
    bands = raw[:, :30].reshape(64, 10, -1).mean(axis=2)
    np.testing.assert_array_equal(np.argmax(bands, axis=1), labels.numpy())


def test_synthetic_hosts_split_each_global_batch_contiguously():
    def batches(context):
        return next(iter(data.build_dataset(
            "synthetic", "train", data_dir=None, global_batch_size=16,
            is_training=True, image_size=32, seed=3, input_context=context)))

    whole = batches(None)
    for host in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=host,
            num_replicas_in_sync=2)
        images, labels = batches(context)
        np.testing.assert_array_equal(images, whole[0][host * 8:][:8])
        np.testing.assert_array_equal(labels, whole[1][host * 8:][:8])


def test_eval_pads_the_last_batch_to_one_static_shape(data_dir):
    # 10,000 test examples in batches of 3,000 per step over two hosts of
    # one replica each: 4 steps of 1,500 per host, 2,000 of them padding.
    weights, labels = [], []
    for host in range(2):
        dataset = data.build_dataset(
            "fashion_mnist", "test", data_dir=data_dir,
            global_batch_size=3000, is_training=False, image_size=28, seed=0,
            input_context=tf.distribute.InputContext(
                num_input_pipelines=2, input_pipeline_id=host,
                num_replicas_in_sync=2))
        assert dataset.element_spec[0].shape == (1500, 28, 28, 1)
        batches = list(dataset)
        assert len(batches) == 4
        weights += [w.numpy() for _, _, w in batches]
        labels += [y.numpy()[w.numpy() > 0] for _, y, w in batches]
    weights = np.concatenate(weights)
    assert set(np.unique(weights)) == {0.0, 1.0}
    assert weights.sum() == 10_000
    assert np.bincount(np.concatenate(labels)).tolist() == [1000] * 10


def test_training_epochs_resume_mid_epoch_and_differ_by_epoch(data_dir):
    def batches(epoch, start_step, count):
        return [(x.numpy(), y.numpy()) for x, y in data.build_dataset(
            "fashion_mnist", "train[:4096]", data_dir=data_dir,
            global_batch_size=64, is_training=True, image_size=32, seed=5,
            epoch=epoch, start_step=start_step).take(count)]

    whole = batches(1, 0, 5)
    resumed = batches(1, 3, 2)
    for (x1, y1), (x2, y2) in zip(whole[3:], resumed):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(whole[0][1], batches(2, 0, 1)[0][1])
    assert len(list(data.build_dataset(
        "fashion_mnist", "train[:4096]", data_dir=data_dir,
        global_batch_size=100, is_training=True, image_size=28,
        seed=5))) == 40  # 4096 // 100: one epoch, last partial batch dropped


def test_validation_split_is_fixed_disjoint_and_complete():
    held_out = data.validation_indices("fashion_mnist", 5000)
    trained = data.training_indices("fashion_mnist", 5000)
    assert len(held_out) == 5000 and len(trained) == 55_000
    assert not set(held_out.tolist()) & set(trained.tolist())
    np.testing.assert_array_equal(
        np.sort(np.concatenate([held_out, trained])), np.arange(60_000))
    # Independent of anything but the count; a larger count is a superset.
    np.testing.assert_array_equal(
        held_out, data.validation_indices("fashion_mnist", 5000))
    assert set(data.validation_indices("fashion_mnist", 100).tolist()) <= set(
        held_out.tolist())
    # Spread over the split, not a contiguous slice of it.
    assert held_out.min() < 1000 and held_out.max() > 59_000
    assert data.steps_per_epoch("fashion_mnist", 4096, 5000) == 13
    for bad in (-1, 60_000, 2.5, True):
        with pytest.raises(ValueError, match=r"validation examples must be"):
            data.validation_indices("fashion_mnist", bad)
    with pytest.raises(ValueError, match=r"55000 training examples"):
        data.steps_per_epoch("fashion_mnist", 60_000, 5000)


def test_selected_examples_are_exactly_the_indexed_ones(data_dir):
    """The held-out pipeline yields the split's examples at those indices."""
    held_out = data.validation_indices("fashion_mnist", 300)
    stored = tfds.load("fashion_mnist", split="train", data_dir=data_dir,
                       as_supervised=True, download=False)
    images, labels = next(iter(stored.batch(60_000)))
    dataset = data.build_dataset(
        "fashion_mnist", "train", data_dir=data_dir, global_batch_size=128,
        is_training=False, image_size=28, seed=0, indices=held_out)
    got = [(x.numpy()[w.numpy() > 0], y.numpy()[w.numpy() > 0])
           for x, y, w in dataset]
    got_images = np.concatenate([x for x, _ in got])
    got_labels = np.concatenate([y for _, y in got])
    assert len(got_labels) == 300
    np.testing.assert_array_equal(got_labels, labels.numpy()[held_out])
    spec = data.DATASETS["fashion_mnist"]
    expected = ((images.numpy()[held_out].astype(np.float32) / 255.0
                 - spec.mean[0]) / spec.std[0])
    np.testing.assert_allclose(got_images, expected, atol=1e-5)
    # Two hosts: disjoint shards that together are the held-out examples.
    shards = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(2, pipeline, 2)
        shard = data.build_dataset(
            "fashion_mnist", "train", data_dir=data_dir,
            global_batch_size=128, is_training=False, image_size=28, seed=0,
            input_context=context, indices=held_out)
        shards.append(np.concatenate([y.numpy()[w.numpy() > 0]
                                      for _, y, w in shard]))
    assert sorted(len(s) for s in shards) == [150, 150]
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)),
                                  np.sort(got_labels))


def _synthetic_positions(images):
    """Positions in synthetic's train split of unaugmented pipeline images."""
    spec = data.DATASETS["synthetic"]
    stored, _ = data.decoded_split("synthetic", "train")
    index = {image.tobytes(): position
             for position, image in enumerate(stored.numpy())}
    pixels = np.rint(images * np.array(spec.std) * 255
                     + np.array(spec.mean) * 255).astype(np.uint8)
    return [index[image.tobytes()] for image in pixels]


def test_training_epochs_leave_out_the_hold_out_and_cover_the_rest():
    """Each epoch of a multi-epoch pipeline: every training example at most
    once, none held out, in a new order; the held-out pipeline reads the
    same examples on every pass."""
    held_out = data.validation_indices("synthetic", 192)
    trained = data.training_indices("synthetic", 192)
    steps = len(trained) // 1000
    dataset = data.build_dataset(
        "synthetic", "train", data_dir=None, global_batch_size=1000,
        is_training=True, image_size=32, seed=4, indices=trained, epochs=2)
    batches = [(x.numpy(), y.numpy()) for x, y in dataset]
    assert len(batches) == 2 * steps  # 8000 // 1000 per epoch
    _, labels = data.decoded_split("synthetic", "train")
    orders = []
    for epoch in range(2):
        epoch_batches = batches[epoch * steps:(epoch + 1) * steps]
        positions = _synthetic_positions(
            np.concatenate([x for x, _ in epoch_batches]))
        assert len(set(positions)) == steps * 1000
        assert set(positions) <= set(trained.tolist())
        np.testing.assert_array_equal(
            np.concatenate([y for _, y in epoch_batches]),
            labels.numpy()[positions])
        orders.append(positions)
    assert orders[0] != orders[1]
    validation = data.build_dataset(
        "synthetic", "train", data_dir=None, global_batch_size=100,
        is_training=False, image_size=32, seed=0, indices=held_out)
    passes = [[(x.numpy(), w.numpy()) for x, _, w in validation]
              for _ in range(2)]
    for (x1, w1), (x2, w2) in zip(*passes):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(w1, w2)
    images = np.concatenate([x[w > 0] for x, w in passes[0]])
    assert _synthetic_positions(images) == held_out.tolist()


def test_a_multi_epoch_pipeline_is_its_epochs_one_after_the_other(data_dir):
    """Same seed, same batches, however the run is split into pipelines."""
    def batches(seed, **position):
        return [(x.numpy(), y.numpy()) for x, y in data.build_dataset(
            "fashion_mnist", "train[:2048]", data_dir=data_dir,
            global_batch_size=256, is_training=True, image_size=28,
            seed=seed, **position)]

    whole = batches(3, epochs=2)
    rebuilt = batches(3, epochs=2)
    by_epoch = batches(3, epoch=0) + batches(3, epoch=1)
    assert len(whole) == len(by_epoch) == 16
    for (x1, y1), (x2, y2), (x3, y3) in zip(whole, rebuilt, by_epoch):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(x1, x3)
        np.testing.assert_array_equal(y1, y3)
    resumed = batches(3, epoch=0, epochs=2, start_step=5)
    for (x1, y1), (x2, y2) in zip(whole[5:], resumed):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(whole[0][0], batches(4)[0][0])
    with pytest.raises(ValueError, match=r"epochs must be an integer >= 1"):
        batches(3, epochs=0)


def test_batch_augmentation_is_pad_crop_flip_and_resize_per_image():
    """The vectorised augmentation against one image at a time in numpy
    (pad 4, crop at the drawn corner, flip) and `tf.image.resize`."""
    spec = data.DATASETS["cifar10"]
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (6, 32, 32, 3)), tf.uint8)
    positions = tf.constant([5, 0, 3, 3, 1, 2])
    offsets = tf.constant([[0, 0], [8, 8], [0, 8], [3, 5], [8, 0], [4, 4]],
                          tf.int32)
    flips = tf.constant([False, True, False, True, True, False])
    columns = data._padded_columns(images)
    for image_size in (32, 40, 24):
        got = data._small_train_batch(columns, positions, offsets, flips,
                                      spec, image_size).numpy()
        for row, position in enumerate(positions.numpy()):
            padded = np.pad(images.numpy()[position],
                            [[4, 4], [4, 4], [0, 0]])
            top, left = offsets.numpy()[row]
            crop = padded[top:top + 32, left:left + 32]
            if flips.numpy()[row]:
                crop = crop[:, ::-1]
            expected = tf.image.resize(crop[None].astype(np.float32),
                                       [image_size, image_size],
                                       antialias=True)[0].numpy()
            expected = (expected / 255 - spec.mean) / spec.std
            np.testing.assert_allclose(got[row], expected, atol=2e-5)
            if image_size == 32:
                # No resize: each pixel is its own float32 normalisation,
                # bit for bit, however the crop moves the pixels.
                mean = np.float32(255) * np.asarray(spec.mean, np.float32)
                std = np.float32(255) * np.asarray(spec.std, np.float32)
                np.testing.assert_array_equal(
                    got[row], (crop.astype(np.float32) - mean) / std)
