"""Input pipelines: tfds data sets, deterministic augmentation, serving.

Every data set is read through tensorflow-datasets, so one pipeline serves
ImageNet and CIFAR on a connected machine and Fashion-MNIST offline.

Offline Fashion-MNIST. The Debian package `dataset-fashion-mnist` ships the
upstream IDX files, but Debian's build (dh_strip_nondeterminism) rewrote
each file's 10-byte gzip header: it dropped the stored file name and
replaced the modification time with the package's release date. The
compressed data is untouched, yet the files no longer match the sha256 sums
tfds records for its `fashion_mnist` builder. `prepare` validates each file
(gzip stream, IDX header and size), puts the upstream header back (file
name plus the original time stamps, recorded below) and checks that the
result is byte-identical to the upstream download. The restored files go
into a temporary `manual_dir` and tfds's own `fashion_mnist` builder
prepares the data set from there: its DownloadManager takes a file from
`manual_dir` when the name matches the registered one, computes its sha256
and size itself and rejects a mismatch, so nothing is downloaded and tfds
vouches for the bytes. tfds writes the prepared data set into an
`incomplete.*` directory and renames it when complete, so an interrupted
preparation never leaves a data set that looks valid.
"""

import contextlib
import dataclasses
import difflib
import fcntl
import gzip
import hashlib
import math
import os
import socket
import struct
import tempfile
import urllib.parse
import urllib.request
import zlib

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants
from tensorflow_datasets.core.download import download_manager
from tensorflow_datasets.core.download import extractor

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# The validation examples are the same for every run, seed and number of
# replicas: a permutation drawn once from this fixed seed.
VALIDATION_SEED = 20210202

_EVAL_CROP_FRACTION = 0.875
_SMALL_PAD = 4


class DataError(ValueError):
    """A data set is missing, corrupt or cannot be prepared here."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about one data set.

    Attributes:
      tfds_name: name of the tfds builder.
      num_classes: number of labels.
      image_shape: (H, W, C) as stored; H and W are None when they vary.
      train_split: tfds split used for training.
      eval_split: tfds split used for evaluation.
      num_train_examples: examples in `train_split`.
      num_eval_examples: examples in `eval_split`.
      preprocessing: 'imagenet' (random-resized crop; eval center crop),
        'small' (pad-and-crop; eval resize only) or 'none' (resize only).
      default_image_size: the usual training resolution.
      mean: per-channel pixel mean of the training set, in [0, 1] units.
      std: per-channel pixel standard deviation, in [0, 1] units.
      shuffle_buffer: examples held by the training shuffle buffer of a
        data set streamed from its records (`in_memory` False).
      in_memory: whether a split is decoded once per process and held in
        memory as uint8 pixels (`decoded_split`): true where the decoded
        train split is a few hundred MB at most. ImageNet streams its
        encoded records every epoch instead (its decoded pixels would not
        fit).
    """

    tfds_name: str
    num_classes: int
    image_shape: tuple
    train_split: str
    eval_split: str
    num_train_examples: int
    num_eval_examples: int
    preprocessing: str
    default_image_size: int
    mean: tuple
    std: tuple
    shuffle_buffer: int
    in_memory: bool = True

    def __post_init__(self):
        if not self.in_memory and self.preprocessing != "imagenet":
            raise ValueError(
                f"{self.tfds_name}: a data set streamed from its records "
                "(in_memory=False) needs preprocessing 'imagenet', whose "
                "crop decodes each JPEG once; hold it in memory instead.")


DATASETS = {
    "imagenet2012": DatasetSpec(
        tfds_name="imagenet2012", num_classes=1000,
        image_shape=(None, None, 3),
        train_split="train", eval_split="validation",
        num_train_examples=1_281_167, num_eval_examples=50_000,
        preprocessing="imagenet", default_image_size=224,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        # Encoded JPEGs average ~110 KB: 10k of them is ~1 GB of host memory.
        shuffle_buffer=10_000, in_memory=False),
    "cifar10": DatasetSpec(
        tfds_name="cifar10", num_classes=10, image_shape=(32, 32, 3),
        train_split="train", eval_split="test",
        num_train_examples=50_000, num_eval_examples=10_000,
        preprocessing="small", default_image_size=32,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        shuffle_buffer=50_000),
    "cifar100": DatasetSpec(
        tfds_name="cifar100", num_classes=100, image_shape=(32, 32, 3),
        train_split="train", eval_split="test",
        num_train_examples=50_000, num_eval_examples=10_000,
        preprocessing="small", default_image_size=32,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        shuffle_buffer=50_000),
    "fashion_mnist": DatasetSpec(
        tfds_name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
        train_split="train", eval_split="test",
        num_train_examples=60_000, num_eval_examples=10_000,
        preprocessing="small", default_image_size=28,
        mean=(0.2860,), std=(0.3530,),
        shuffle_buffer=60_000),
    # Generated, not read: uniform noise images whose label is the brightest
    # of 10 horizontal bands. For throughput runs and for tests that need
    # data without exact ties (Fashion-MNIST's constant background makes
    # ReLU masks flip on rounding-level differences).
    "synthetic": DatasetSpec(
        tfds_name="", num_classes=10, image_shape=(32, 32, 3),
        train_split="train", eval_split="test",
        num_train_examples=8192, num_eval_examples=1024,
        preprocessing="none", default_image_size=32,
        mean=(0.5, 0.5, 0.5), std=(0.2887, 0.2887, 0.2887),
        shuffle_buffer=8192),
}

_SYNTHETIC_SPLITS = {"train": 0, "test": 1}


def _synthetic_split_id(split, spec):
    if split not in _SYNTHETIC_SPLITS:
        raise ValueError(
            f"split: {split!r} is not a split of synthetic; it has "
            f"{', '.join(_SYNTHETIC_SPLITS)}.")
    return _SYNTHETIC_SPLITS[split]


def _synthetic_example(index, split_id, spec):
    """The (uint8 image, label) generated from element `index` of a split."""
    image = tf.random.stateless_uniform(
        spec.image_shape, seed=tf.stack([tf.cast(index, tf.int64),
                                         split_id]),
        minval=0, maxval=256, dtype=tf.int32)
    bands = tf.reshape(tf.cast(image[:30], tf.float32),
                       [spec.num_classes, -1])
    label = tf.argmax(tf.reduce_mean(bands, axis=1), output_type=tf.int32)
    return tf.cast(image, tf.uint8), label


@dataclasses.dataclass(frozen=True)
class _IdxFile:
    """An upstream Fashion-MNIST file: gzip time stamp and IDX dimensions."""

    mtime: int
    dims: tuple


# Upstream gzip headers are `1f8b 0808 <mtime> 00 03 <name>\0`; Debian keeps
# everything but the name and the time stamp, which are recorded here (they
# reproduce the sha256 sums tfds registers for fashion_mnist).
_FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": _IdxFile(1504176606, (60_000, 28, 28)),
    "train-labels-idx1-ubyte.gz": _IdxFile(1504176606, (60_000,)),
    "t10k-images-idx3-ubyte.gz": _IdxFile(1504176627, (10_000, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": _IdxFile(1504176627, (10_000,)),
}

_GZIP_FEXTRA, _GZIP_FNAME, _GZIP_FCOMMENT, _GZIP_FHCRC = 4, 8, 16, 2

_FASHION_MNIST_FIX = (
    "Fix: `apt-get install -y --reinstall dataset-fashion-mnist`, or pass "
    "--data_dir with an already prepared fashion_mnist data set.")


def _spec(name):
    if name not in DATASETS:
        match = difflib.get_close_matches(str(name), list(DATASETS), n=1)
        hint = f" Did you mean '{match[0]}'?" if match else ""
        raise ValueError(
            f"name: unknown data set '{name}'.{hint} Choose one of "
            f"{', '.join(sorted(DATASETS))}.")
    return DATASETS[name]


def _check_positive(value, argument):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be an integer >= 1, got {value!r}.")


def _expand_data_dir(data_dir):
    data_dir = os.fspath(data_dir or tfds_constants.DATA_DIR)
    if _is_remote(data_dir):
        return data_dir
    return os.path.abspath(os.path.expanduser(data_dir))


def _is_remote(data_dir):
    """Whether `data_dir` is a URL tf.io.gfile reads (gs://, s3://, ...)."""
    return "://" in data_dir


def prepare(name, data_dir, *, fashion_mnist_dir=DEBIAN_FASHION_MNIST_DIR):
    """Makes sure data set `name` is prepared in `data_dir`.

    Fashion-MNIST is prepared from the local IDX files (see the module
    docstring); the other data sets are downloaded and prepared by tfds
    (ImageNet needs its archives in `<data_dir>/downloads/manual/`).
    Does nothing when the data set is already prepared.

    Args:
      name: a key of `DATASETS`.
      data_dir: tfds data directory (`~` is expanded); None means tfds's
        default, $TFDS_DATA_DIR or ~/tensorflow_datasets.
      fashion_mnist_dir: directory holding the Fashion-MNIST `*.gz` IDX
        files (Debian's by default).

    Returns:
      The tfds builder of the prepared data set.

    Raises:
      ValueError: on an unknown name.
      DataError: when the data set cannot be prepared here; the message
        names the file or host at fault and the fix.
    """
    spec = _spec(name)
    if name == "synthetic":
        return None  # generated on the fly
    data_dir = _expand_data_dir(data_dir)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with _preparation_lock(data_dir, spec.tfds_name):
        # A process that held the lock before this one may have prepared it.
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
        if builder.is_prepared():
            return builder
        if spec.tfds_name == "fashion_mnist":
            _prepare_fashion_mnist(builder, data_dir, fashion_mnist_dir)
        else:
            _download_and_prepare(builder, name, data_dir)
    return builder


@contextlib.contextmanager
def _preparation_lock(data_dir, tfds_name):
    """Lets one process at a time prepare `tfds_name` in `data_dir`.

    tfds prepares into a temporary folder and renames it at the end; two
    trainers started together on a fresh machine (a study's side-by-side
    runs, the workers of one host) would both prepare, and the second
    rename fails. The lock file lives in tfds's own downloads folder.
    A remote data_dir (a Cloud TPU job's gs:// bucket) cannot hold a lock
    file: hosts sharing it are not serialised, so prepare the data set
    once before a multi-host job.
    """
    if _is_remote(data_dir):
        logging.warning(
            "Preparing %s in the remote %s without a lock: other hosts "
            "preparing it at the same time would fail. Prepare it once, from "
            "one host, before a multi-host job.", tfds_name, data_dir)
        yield
        return
    downloads = os.path.join(data_dir, "downloads")
    os.makedirs(downloads, exist_ok=True)
    with open(os.path.join(downloads, f"{tfds_name}.prepare.lock"),
              "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare_fashion_mnist(builder, data_dir, source_dir):
    url_infos = builder.url_infos
    restored = {}
    for url_info in url_infos.values():
        path = os.path.join(source_dir, url_info.filename)
        restored[url_info.filename] = _restore_upstream_file(path, url_info)
    # Restored archives and tfds's extracted copies are only needed while
    # preparing; a temporary directory in the downloads folder the
    # preparation lock made keeps them out of data_dir (a remote data_dir
    # stages them in the local temporary folder).
    with tempfile.TemporaryDirectory(
            prefix="fashion_mnist_local.",
            dir=None if _is_remote(data_dir) else os.path.join(
                data_dir, "downloads")) as tmp_dir:
        manual_dir = os.path.join(tmp_dir, "manual")
        os.makedirs(manual_dir)
        for filename, content in restored.items():
            with open(os.path.join(manual_dir, filename), "wb") as f:
                f.write(content)
        config = tfds.download.DownloadConfig(
            manual_dir=manual_dir,
            # Every URL must have a registered checksum for tfds to check.
            force_checksums_validation=True,
            try_download_gcs=False)
        logging.info("Preparing fashion_mnist in %s from %s.", data_dir,
                     source_dir)
        try:
            builder.download_and_prepare(
                download_dir=os.path.join(tmp_dir, "downloads"),
                download_config=config)
        except download_manager.NonMatchingChecksumError as err:
            raise DataError(
                f"tfds rejected the restored Fashion-MNIST files from "
                f"{source_dir}: {err}\n{_FASHION_MNIST_FIX}") from err


def _restore_upstream_file(path, url_info):
    """Validates one Fashion-MNIST file and returns its upstream bytes.

    Args:
      path: the local `.gz` file (Debian-normalised or upstream).
      url_info: tfds's registered size and sha256 for the upstream file.

    Returns:
      The upstream file's bytes.

    Raises:
      DataError: the file is missing, not gzip, truncated, not the expected
        IDX array, or does not reproduce the upstream sha256.
    """
    filename = os.path.basename(path)
    expected = _FASHION_MNIST_FILES.get(filename)
    if expected is None:
        raise DataError(
            f"tfds expects a Fashion-MNIST file named {filename}, which this "
            "module does not know; tensorflow-datasets changed its "
            "fashion_mnist sources.")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataError(f"Missing or unreadable Fashion-MNIST file {path} "
                        f"({err.strerror}). {_FASHION_MNIST_FIX}") from err
    try:
        content = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a complete gzip file ({err}); it is "
                        f"truncated or corrupt. {_FASHION_MNIST_FIX}") from err
    _check_idx(path, content, expected.dims)
    upstream = (b"\x1f\x8b\x08" + bytes([_GZIP_FNAME])
                + struct.pack("<I", expected.mtime) + b"\x00\x03"
                + filename[:-len(".gz")].encode() + b"\x00"
                + raw[_gzip_header_length(path, raw):])
    checksum = hashlib.sha256(upstream).hexdigest()
    if checksum != url_info.checksum or len(upstream) != url_info.size:
        raise DataError(
            f"{path} decompresses to a valid IDX array but is not the "
            f"upstream Fashion-MNIST file: sha256 {checksum} ({len(upstream)} "
            f"bytes) after restoring its gzip header, tfds expects "
            f"{url_info.checksum} ({int(url_info.size)} bytes). "
            f"{_FASHION_MNIST_FIX}")
    return upstream


def _gzip_header_length(path, raw):
    """Length of the gzip member header (RFC 1952) at the start of raw."""
    flags = raw[3]
    length = 10
    try:
        if flags & _GZIP_FEXTRA:
            length += 2 + int.from_bytes(raw[length:length + 2], "little")
        if flags & _GZIP_FNAME:
            length = raw.index(b"\x00", length) + 1
        if flags & _GZIP_FCOMMENT:
            length = raw.index(b"\x00", length) + 1
    except ValueError as err:
        raise DataError(f"{path} has a malformed gzip header. "
                        f"{_FASHION_MNIST_FIX}") from err
    if flags & _GZIP_FHCRC:
        length += 2
    return length


def _check_idx(path, content, dims):
    # IDX magic: two zero bytes, element type 0x08 (uint8), number of dims.
    magic = bytes([0, 0, 8, len(dims)])
    header_size = 4 + 4 * len(dims)
    header = content[:header_size]
    if header[:4] != magic:
        raise DataError(
            f"{path} has IDX magic number {header[:4].hex()}, expected "
            f"{magic.hex()}; it is not the expected Fashion-MNIST file. "
            f"{_FASHION_MNIST_FIX}")
    found = (struct.unpack(f">{len(dims)}I", header[4:])
             if len(header) == header_size else None)
    data_size = math.prod(dims)
    if found != tuple(dims) or len(content) != header_size + data_size:
        raise DataError(
            f"{path} holds {len(content)} bytes with dimensions {found}; "
            f"expected dimensions {tuple(dims)} in {header_size + data_size} "
            f"bytes. The file is truncated or corrupt. {_FASHION_MNIST_FIX}")


def _download_and_prepare(builder, name, data_dir):
    # tfds's default manual_dir: archives found there are not downloaded.
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        fix = (f"Put the archives named in tfds's instructions above into "
               f"{manual_dir}, or pass --data_dir with an already prepared "
               f"{name}.")
    else:
        archives = ", ".join(
            info.filename for info in (builder.url_infos or {}).values())
        fix = (f"Put {archives} into {manual_dir}, or prepare {name} on a "
               f"connected machine (`tfds build {name} --data_dir DIR`) and "
               "pass --data_dir DIR here.")
        _check_hosts_reachable(builder, name, manual_dir, fix)
    logging.info("Preparing %s in %s with tfds.", name, data_dir)
    try:
        builder.download_and_prepare()
    except (AssertionError, OSError, tfds.download.DownloadError,
            download_manager.NonMatchingChecksumError,
            extractor.ExtractError) as err:
        raise DataError(f"Could not prepare {name} in {data_dir}: {err}\n"
                        f"{fix}") from err


def _check_hosts_reachable(builder, name, manual_dir, fix):
    """Fails fast offline: tfds itself retries for minutes before failing."""
    # Behind a proxy a direct connection proves nothing; let tfds try.
    if urllib.request.getproxies():
        return
    for url, url_info in (builder.url_infos or {}).items():
        # tf.io.gfile: the manual folder may be in a gs:// data_dir.
        if url_info.filename and tf.io.gfile.exists(
                os.path.join(manual_dir, url_info.filename)):
            continue
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port), timeout=10):
                pass
        except OSError as err:
            raise DataError(
                f"Cannot download {name}: {parts.hostname}:{port} is not "
                f"reachable ({err}). {fix}") from err


def validation_indices(name, count):
    """Positions in the train split of the examples held out for validation.

    The held-out examples are the first `count` of one permutation of the
    train split drawn from `VALIDATION_SEED`: the same examples for every
    run, training seed and number of replicas or hosts, and a larger
    `count` holds out a superset of a smaller one. Training then uses the
    other examples (`training_indices`).

    Args:
      name: a key of `DATASETS`.
      count: examples to hold out, 0 <= count < the train split's size.

    Returns:
      Sorted int64 numpy array of `count` positions in the train split's
      stored order.
    """
    spec = _spec(name)
    total = spec.num_train_examples
    if isinstance(count, bool) or not isinstance(count, int) or not (
            0 <= count < total):
        raise ValueError(
            f"validation examples must be an integer in [0, {total}) for "
            f"{name} (its train split has {total} examples), got {count!r}; "
            "e.g. 5000.")
    permutation = np.random.default_rng(VALIDATION_SEED).permutation(total)
    return np.sort(permutation[:count]).astype(np.int64)


def training_indices(name, validation_examples):
    """Positions of the train split's examples not held out for validation.

    Args:
      name: a key of `DATASETS`.
      validation_examples: examples held out (see `validation_indices`).

    Returns:
      Sorted int64 numpy array, the complement of `validation_indices`.
    """
    held_out = validation_indices(name, validation_examples)
    keep = np.ones(_spec(name).num_train_examples, bool)
    keep[held_out] = False
    return np.flatnonzero(keep).astype(np.int64)


def steps_per_epoch(name, global_batch_size, validation_examples=0):
    """Training steps in one pass over the train split (last batch dropped).

    Args:
      name: a key of `DATASETS`.
      global_batch_size: examples per step over all replicas.
      validation_examples: examples of the train split held out for
        validation (see `validation_indices`), not trained on.

    Returns:
      The number of full global batches in the trained part of the split.
    """
    spec = _spec(name)
    _check_positive(global_batch_size, "global_batch_size")
    trained = spec.num_train_examples - validation_examples
    if global_batch_size > trained:
        raise ValueError(
            f"global_batch_size {global_batch_size} exceeds the {trained} "
            f"training examples of {name} (of {spec.num_train_examples}, "
            f"{validation_examples} held out for validation).")
    return trained // global_batch_size


def preprocess_for_serving(images_uint8, name, image_size):
    """Eval preprocessing of a batch of raw images (for the SavedModel).

    Args:
      images_uint8: uint8 tensor [N, H, W, C] of raw pixels.
      name: a key of `DATASETS`.
      image_size: side of the square model input.

    Returns:
      float32 tensor [N, image_size, image_size, C], normalised exactly as
      `build_dataset(..., is_training=False)` does.
    """
    spec = _spec(name)
    _check_positive(image_size, "image_size")
    images = tf.convert_to_tensor(images_uint8)
    if images.dtype != tf.uint8:
        raise ValueError(
            f"images_uint8 must have dtype uint8, got {images.dtype.name}.")
    if images.shape.rank not in (None, 4):
        raise ValueError(
            f"images_uint8 must be [N, H, W, C], got shape {images.shape}.")
    return _eval_image(images, spec, image_size)


def _eval_image(image, spec, image_size):
    """Eval preprocessing of one image [H, W, C] or a batch [N, H, W, C]."""
    if spec.preprocessing == "imagenet":
        shape = tf.shape(image)
        height, width = shape[-3], shape[-2]
        crop = tf.cast(
            tf.round(_EVAL_CROP_FRACTION
                     * tf.cast(tf.minimum(height, width), tf.float32)),
            tf.int32)
        image = tf.image.crop_to_bounding_box(
            image, (height - crop) // 2, (width - crop) // 2, crop, crop)
        image = _resize(image, image_size)
    else:
        image = _resize_if_needed(image, image_size)
    return _normalize(image, spec)


def _resize(image, image_size):
    return tf.image.resize(image, [image_size, image_size],
                           method="bilinear", antialias=True)


def _resize_if_needed(image, image_size):
    if image.shape[-3] == image_size and image.shape[-2] == image_size:
        return tf.cast(image, tf.float32)
    return _resize(image, image_size)


def _normalize(image, spec):
    mean = tf.constant(spec.mean, tf.float32) * 255.0
    std = tf.constant(spec.std, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std


def _imagenet_train_image(image_bytes, seed, image_size):
    """Random-resized crop (Inception style) and flip of one encoded JPEG.

    Args:
      image_bytes: scalar string tensor, a JPEG.
      seed: int tensor [2] for the stateless random ops.
      image_size: side of the square output.

    Returns:
      float32 [image_size, image_size, 3], not normalised.
    """
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(image_bytes),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=crop_seed,
        # The box is the whole image: coverage is the area fraction, which
        # area_range already bounds.
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    # Decoding only the crop window skips most of the JPEG's pixels.
    image = tf.image.decode_and_crop_jpeg(
        image_bytes, tf.stack([offset_y, offset_x, height, width]), channels=3)
    image = _resize(image, image_size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def _tfds_split(builder, name, split):
    # tfds split syntax: "train", "train[:10%]", "train+test[:50]".
    split_names = ([part.split("[")[0].strip() for part in split.split("+")]
                   if isinstance(split, str) else [None])
    if not all(part in builder.info.splits for part in split_names):
        raise ValueError(
            f"split: {split!r} is not a split of {name}; it has "
            f"{', '.join(sorted(builder.info.splits))}.")
    return split


def _tfds_records(name, split, data_dir, shuffle_seed, input_context):
    """Undecoded records {'image': encoded bytes, 'label'} of a tfds split.

    Only this host's slice is read. `shuffle_seed` None reads the files in
    order; an integer shuffles the file order with it, the same way every
    time the data set is read.
    """
    builder = prepare(name, data_dir)
    split = _tfds_split(builder, name, split)
    if input_context is not None:
        # Slicing the split (rather than Dataset.shard) lets each host read
        # only the tfrecord files of its own slice.
        split = tfds.even_splits(
            split, n=input_context.num_input_pipelines)[
                input_context.input_pipeline_id]
    return builder.as_dataset(
        split=split,
        shuffle_files=shuffle_seed is not None,
        # Decoding waits until the records a resumed run skips are gone.
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(
            shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False,
            try_autocache=False))


def _decode_image(encoded, spec):
    """uint8 [H, W, C] pixels of an encoded (PNG or JPEG) image."""
    image = tf.io.decode_image(encoded, channels=spec.image_shape[-1],
                               expand_animations=False)
    return tf.ensure_shape(image, spec.image_shape)


def num_examples(name, split, data_dir=None):
    """The number of examples in `split` of data set `name`.

    Args:
      name: a key of `DATASETS`.
      split: a split of it, in tfds split syntax ('train[:10%]').
      data_dir: tfds data directory; None means tfds's default.
    """
    spec = _spec(name)
    if name == "synthetic":
        return (spec.num_train_examples
                if _synthetic_split_id(split, spec) == 0
                else spec.num_eval_examples)
    builder = prepare(name, data_dir)
    return builder.info.splits[_tfds_split(builder, name, split)].num_examples


def _epoch_seed(seed, epoch):
    """A 31-bit seed for epoch `epoch` of a run seeded with `seed`."""
    digest = hashlib.sha256(f"{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def _check_count(value, argument):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{argument} must be an integer >= 0, got {value!r}.")


def _select_records(records, indices):
    """The records at `indices`, positions in the records' stored order."""
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or indices.size == 0 or indices.min() < 0:
        raise ValueError("indices must be a non-empty 1-D array of positions "
                         f">= 0, got shape {indices.shape}.")
    selected = np.zeros(int(indices.max()) + 1, bool)
    selected[indices] = True
    selected = tf.constant(selected)
    last = selected.shape[0] - 1

    def keep(position, record):
        del record
        return tf.logical_and(
            position <= last, tf.gather(selected, tf.minimum(position, last)))

    return records.enumerate().filter(keep).map(
        lambda position, record: record)


# Decoded splits (and the train splits' padded columns) held by this
# process, oldest first; a few at most, as tests build pipelines over several
# data directories and split slices.
_DECODED_SPLITS = {}
_PADDED_COLUMNS = {}
_SPLITS_KEPT = 4


def _cached(store, key, make):
    if key not in store:
        if len(store) >= _SPLITS_KEPT:
            del store[next(iter(store))]
        store[key] = make()
    return store[key]


def decoded_split(name, split, data_dir=None):
    """Every image and label of a split, decoded once per process.

    The first call reads and decodes the split in stored order; later calls
    for the same (name, split, data_dir) return the same tensors, so every
    epoch and every evaluation of a run (and of later runs in the process)
    reuses them.

    Args:
      name: a key of `DATASETS` whose spec has `in_memory` set.
      split: a split of it, in tfds split syntax ('train[:10%]').
      data_dir: tfds data directory; None means tfds's default.

    Returns:
      (images, labels): uint8 tensor [N, H, W, C] and int32 tensor [N], the
      split's examples in stored order (position i is `indices` position i).

    Raises:
      DataError: the split's files are corrupt or truncated.
    """
    spec = _spec(name)
    if not spec.in_memory:
        raise ValueError(
            f"name: {name} is streamed from its records, not held in memory; "
            "read it with build_dataset.")
    key = (name, split, _split_location(name, data_dir))
    return _cached(_DECODED_SPLITS, key,
                   lambda: _decode_split(name, split, data_dir, spec))


def _split_location(name, data_dir):
    return None if name == "synthetic" else _expand_data_dir(data_dir)


def _decode_split(name, split, data_dir, spec):
    if name == "synthetic":
        split_id = _synthetic_split_id(split, spec)
        examples = tf.data.Dataset.range(num_examples(name, split)).map(
            lambda index: _synthetic_example(index, split_id, spec),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        examples = _tfds_records(name, split, data_dir, None, None).map(
            lambda record: (_decode_image(record["image"], spec),
                            tf.cast(record["label"], tf.int32)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images, labels = [], []
    try:
        for image_batch, label_batch in examples.batch(4096):
            images.append(image_batch.numpy())
            labels.append(label_batch.numpy())
    except tf.errors.DataLossError as error:
        directory = _expand_data_dir(data_dir)
        raise DataError(
            f"The {name} data files in {directory} are corrupt or truncated "
            f"({error.message.splitlines()[0]}). Delete the {name} folder "
            f"there and rerun to prepare it again.") from None
    with tf.device("/CPU:0"):
        return (tf.constant(np.concatenate(images)),
                tf.constant(np.concatenate(labels).astype(np.int32)))


def _padded_columns(images):
    """Zero-padded images stored column by column, for `_small_train_batch`.

    Args:
      images: uint8 [N, H, W, C].

    Returns:
      uint8 [N * (W + 2 * pad), (H + 2 * pad) * C]: row n * (W + 2 * pad) + j
      is column j of padded image n.
    """
    count, height, width, channels = images.shape
    padded = np.pad(images.numpy(), [[0, 0], [_SMALL_PAD, _SMALL_PAD],
                                     [_SMALL_PAD, _SMALL_PAD], [0, 0]])
    columns = np.ascontiguousarray(padded.transpose(0, 2, 1, 3)).reshape(
        count * (width + 2 * _SMALL_PAD), (height + 2 * _SMALL_PAD) * channels)
    with tf.device("/CPU:0"):
        return tf.constant(columns)


def _small_train_batch(columns, positions, crop_offsets, flips, spec,
                       image_size):
    """Pad-4 random crop and flip of a batch, normalised.

    Two gathers of whole pixel rows and columns do it for the whole batch
    (gathering single pixels, or cropping image by image, is 5-10x
    slower): the crop's columns (read backwards when flipped) from the
    images stored by column, then, after one transpose, the crop's rows.

    Args:
      columns: `_padded_columns` of the split's images.
      positions: int [B], the examples of the batch.
      crop_offsets: int32 [B, 2], row and column of each crop's corner in
        the padded image, in [0, 2 * pad].
      flips: bool [B], which images are flipped left to right.
      spec: the data set's `DatasetSpec`.
      image_size: side of the square output.

    Returns:
      float32 [B, image_size, image_size, C], normalised.
    """
    height, width, channels = spec.image_shape
    padded_height = height + 2 * _SMALL_PAD
    padded_width = width + 2 * _SMALL_PAD
    batch = positions.shape[0]
    column_index = (
        tf.cast(positions, tf.int32)[:, None] * padded_width
        + crop_offsets[:, 1:]
        + tf.where(flips[:, None], tf.range(width - 1, -1, -1),
                   tf.range(width)))
    image = tf.reshape(tf.gather(columns, column_index),
                       [batch, width, padded_height, channels])
    # Transposed as int16 and normalised last: 2-byte pixels move instead
    # of float32 ones, and only the crop's are normalised, not the padding
    # (the same numbers: int16 holds every uint8 exactly). oneDNN's uint8
    # transpose logs an error and falls back to Eigen; int16 goes to Eigen
    # quietly.
    image = tf.transpose(tf.cast(image, tf.int16), [0, 2, 1, 3])
    image = tf.reshape(image, [batch * padded_height, width, channels])
    row_index = (tf.range(batch)[:, None] * padded_height
                 + crop_offsets[:, :1] + tf.range(height))
    return _separable_resize(_normalize(tf.gather(image, row_index), spec),
                             image_size)


def _resize_matrix(size, image_size):
    """[image_size, size]: `_resize` of a 1-D signal as a matrix.

    Bilinear resizing (antialiased or not) acts on rows and columns
    separately and linearly, with weights that sum to 1, so two matrix
    products give what `_resize` gives (to float rounding), before or
    after normalisation, at a fraction of its cost on small images.
    """
    basis = tf.eye(size)[:, :, None, None]  # `size` signals [size, 1, 1]
    resized = _resize(basis, image_size)[:, :, 0, 0]
    return tf.transpose(resized)


def _separable_resize(images, image_size):
    """`_resize` of float32 [B, H, W, C] images by `_resize_matrix`."""
    height, width = images.shape[1], images.shape[2]
    if height != image_size:
        images = tf.einsum("sh,bhwc->bswc",
                           _resize_matrix(height, image_size), images)
    if width != image_size:
        images = tf.einsum("tw,bswc->bstc",
                           _resize_matrix(width, image_size), images)
    return images


def _in_memory_options():
    # Autotuning would pick the same small buffers these batch-level
    # pipelines need, but its thread stalls each iterator's teardown (up to
    # 20 s per evaluation or epoch was measured on a loaded machine).
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


def _in_memory_training(images, labels, columns, positions, spec, *,
                        global_batch_size, batch_size, pipelines, pipeline_id,
                        image_size, seed, epoch, epochs, start_step):
    """Training batches gathered from decoded images, `epochs` epochs long.

    Epoch e is a permutation of `positions` drawn from (seed, e); global
    batch k of it holds elements k * B .. (k + 1) * B - 1 and is augmented
    with draws keyed by (seed, e, k) for the whole global batch. Each host
    keeps its contiguous share of every global batch, split into
    per-replica batches, so the global batches are the same for any number
    of hosts and replicas, and a run resumed at any step reads the same
    batches as one that was not stopped.
    """
    steps = len(positions) // global_batch_size
    host_examples = global_batch_size // pipelines
    host_start = pipeline_id * host_examples
    replica_batches = host_examples // batch_size
    positions = tf.constant(positions, tf.int64)
    run_key = tf.constant([seed, 0], tf.int64)

    # No Python control flow depends on tensors here: skipping autograph
    # saves most of the pipeline's set-up time (about 0.7 s).
    @tf.autograph.experimental.do_not_convert
    def epoch_batches(epoch):
        shuffle_key, augment_key = tf.unstack(
            tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(run_key, epoch), 2))
        order = tf.random.experimental.stateless_shuffle(positions,
                                                         shuffle_key)
        order = tf.reshape(order[:steps * global_batch_size],
                           [steps, global_batch_size])
        order = order[:, host_start:host_start + host_examples]
        starts = host_start + batch_size * tf.range(replica_batches)
        return tf.data.Dataset.from_tensor_slices((
            tf.repeat(tf.range(steps), replica_batches),
            tf.tile(starts, [steps]),
            tf.reshape(order, [steps * replica_batches, batch_size]),
        )).map(lambda step, start, batch: (
            tf.random.experimental.stateless_fold_in(augment_key, step),
            start, batch))

    @tf.autograph.experimental.do_not_convert
    def augment(key, start, batch_positions):
        crop_key, flip_key = tf.unstack(
            tf.random.experimental.stateless_split(key, 2))
        # Drawn for the whole global batch, then this batch's rows.
        rows = slice(start, start + batch_size)
        if spec.preprocessing == "small":
            offsets = tf.random.stateless_uniform(
                [global_batch_size, 2], crop_key, minval=0,
                maxval=2 * _SMALL_PAD + 1, dtype=tf.int32)[rows]
            flips = tf.random.stateless_uniform(
                [global_batch_size], flip_key, minval=0, maxval=2,
                dtype=tf.int32)[rows] > 0
            batch = _small_train_batch(columns, batch_positions, offsets,
                                       flips, spec, image_size)
        else:
            batch = _separable_resize(
                _normalize(tf.gather(images, batch_positions), spec),
                image_size)
        channels = spec.image_shape[-1]
        batch = tf.ensure_shape(batch,
                                [batch_size, image_size, image_size, channels])
        return batch, tf.gather(labels, batch_positions)

    dataset = tf.data.Dataset.range(epoch, epoch + epochs).flat_map(
        epoch_batches)
    dataset = dataset.skip(start_step * replica_batches)
    return dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)


def _in_memory_eval(images, labels, positions, spec, *, global_batch_size,
                    batch_size, pipelines, pipeline_id, image_size):
    """Eval batches of `positions`, this host's every `pipelines`-th one,
    padded with weight-0 copies of the first example to whole steps."""
    steps = -(-len(positions) // global_batch_size)
    host_positions = positions[pipeline_id::pipelines]
    padded = steps * (global_batch_size // pipelines)
    weights = np.zeros(padded, np.float32)
    weights[:len(host_positions)] = 1.0
    host_positions = np.concatenate([
        host_positions,
        np.zeros(padded - len(host_positions), np.int64)]).astype(np.int64)
    shape = (batch_size, image_size, image_size, spec.image_shape[-1])

    @tf.autograph.experimental.do_not_convert
    def evaluate(batch_positions, batch_weights):
        batch = _eval_image(tf.gather(images, batch_positions), spec,
                            image_size)
        return (tf.ensure_shape(batch, shape),
                tf.gather(labels, batch_positions), batch_weights)

    # Cached once read through: every later pass over this dataset (each
    # evaluation of a run) reads the preprocessed batches.
    return tf.data.Dataset.from_tensor_slices((
        host_positions.reshape(-1, batch_size), weights.reshape(-1, batch_size),
    )).map(evaluate, num_parallel_calls=tf.data.AUTOTUNE,
           deterministic=True).cache()


def build_dataset(name, split, *, data_dir, global_batch_size, is_training,
                  image_size, seed, input_context=None, epoch=0, epochs=1,
                  start_step=0, indices=None):
    """Input pipeline: training epochs, or the whole eval split.

    Data sets held in memory (`DatasetSpec.in_memory`: CIFAR,
    Fashion-MNIST, synthetic) are decoded once per process
    (`decoded_split`); each batch is then a gather of uint8 pixels and one
    vectorised augmentation of the whole batch. Training epoch e reads a
    permutation of the examples drawn from (seed, e), augmented with draws
    keyed by (seed, e, step); every host keeps its contiguous share of each
    global batch, so the global batches do not depend on the number of
    hosts, and a run resumed mid-epoch starts at its step without reading
    or augmenting the steps it skips.

    ImageNet streams its records: the encoded records go through a shuffle
    seeded by (seed, epoch), the records of the epoch's first `start_step`
    steps are dropped before anything is decoded, and each JPEG is decoded
    only inside its random crop window. The augmentation of the element at
    position i of the epoch is keyed by (seed, input pipeline, epoch, i).

    Either way the same arguments give the same batches on every run,
    resumed or not. An epoch yields at least
    `steps_per_epoch(name, global_batch_size)` batches (a last partial
    batch is dropped), all of one static shape.

    Eval reads the split once, in order, and pads it to whole batches: every
    batch has the same static shape (as TPU programs need) and every example
    is in exactly one of them, with weight 1; the padding has weight 0.

    Args:
      name: a key of `DATASETS` (prepared with `prepare` when missing).
      split: tfds split, e.g. `DATASETS[name].train_split` or 'train[:10%]'.
      data_dir: tfds data directory; None means tfds's default.
      global_batch_size: examples per step over all replicas.
      is_training: augment and shuffle `epochs` epochs when True.
      image_size: side of the square output images.
      seed: integer seed of the shuffle and the augmentation.
      input_context: optional `tf.distribute.InputContext`; this host then
        reads only its `1 / num_input_pipelines` share of the examples and
        batches by the per-replica batch size.
      epoch: the training epoch (from 0) to start at.
      epochs: training epochs to read, one after the other, from `epoch`:
        one pipeline (and iterator) for a whole run. Streamed data sets
        (ImageNet) read one epoch per pipeline.
      start_step: the step within `epoch` to start at.
      indices: optional positions (in stored order) of the only examples of
        `split` to use, e.g. `training_indices` or `validation_indices`.
        ImageNet then reads the whole split's records in stored order (no
        file shuffling), keeps the selected ones, still undecoded, and its
        `1 / num_input_pipelines` shard of them; its training order then
        comes from the shuffle buffer alone, not a full shuffle.

    Returns:
      A `tf.data.Dataset` of (images [B, image_size, image_size, C] float32,
      labels [B] int32) for training; (images, labels, weights [B] float32)
      for eval.
    """
    spec = _spec(name)
    _check_positive(global_batch_size, "global_batch_size")
    _check_positive(image_size, "image_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    _check_count(epoch, "epoch")
    _check_positive(epochs, "epochs")
    _check_count(start_step, "start_step")
    if epochs > 1 and not spec.in_memory:
        raise ValueError(
            f"epochs: {name} is streamed from its records one epoch per "
            f"pipeline; build one pipeline per epoch (epochs=1), got {epochs}.")
    batch_size = global_batch_size
    pipelines, pipeline_id = 1, 0
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(
            global_batch_size)
        pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id
    if not spec.in_memory:
        dataset = _streamed_dataset(
            name, split, spec, data_dir=data_dir,
            global_batch_size=global_batch_size, batch_size=batch_size,
            is_training=is_training, image_size=image_size, seed=seed,
            input_context=input_context, epoch=epoch, start_step=start_step,
            indices=indices)
        options = tf.data.Options()
        options.deterministic = True
        return dataset.with_options(options)

    images, labels = decoded_split(name, split, data_dir)
    positions = (np.arange(images.shape[0], dtype=np.int64)
                 if indices is None else _checked_positions(indices,
                                                            images.shape[0]))
    layout = dict(global_batch_size=global_batch_size, batch_size=batch_size,
                  pipelines=pipelines, pipeline_id=pipeline_id,
                  image_size=image_size)
    if is_training:
        if global_batch_size > len(positions):
            raise ValueError(
                f"global_batch_size {global_batch_size} exceeds the "
                f"{len(positions)} training examples given.")
        columns = (_cached(_PADDED_COLUMNS,
                           (name, split, _split_location(name, data_dir)),
                           lambda: _padded_columns(images))
                   if spec.preprocessing == "small" else None)
        dataset = _in_memory_training(
            images, labels, columns, positions, spec, seed=seed, epoch=epoch,
            epochs=epochs, start_step=start_step, **layout)
    else:
        dataset = _in_memory_eval(images, labels, positions, spec, **layout)
    # Two batches ahead: enough to overlap one gather with one step.
    return dataset.prefetch(2).with_options(_in_memory_options())


def _checked_positions(indices, count):
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or indices.size == 0 or indices.min() < 0 or (
            indices.max() >= count):
        raise ValueError(
            "indices must be a non-empty 1-D array of positions in "
            f"[0, {count}), got shape {indices.shape}"
            + (f" with values in [{indices.min()}, {indices.max()}]."
               if indices.ndim == 1 and indices.size else "."))
    return indices


def _streamed_dataset(name, split, spec, *, data_dir, global_batch_size,
                      batch_size, is_training, image_size, seed,
                      input_context, epoch, start_step, indices):
    """One epoch (or the eval split) read from a data set's records."""
    pipelines, pipeline_id = 1, 0
    if input_context is not None:
        pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id
    epoch_seed = _epoch_seed(seed, epoch)
    # With indices, every host reads the whole split in stored order so that
    # a position names the same example everywhere.
    records = _tfds_records(
        name, split, data_dir,
        epoch_seed if is_training and indices is None else None,
        input_context if indices is None else None)

    def decode(record):
        if is_training:
            return record["image"], record["label"]  # see augment
        return _decode_image(record["image"], spec), record["label"]

    if indices is not None:
        records = _select_records(records, indices)
        if pipelines > 1:
            records = records.shard(pipelines, pipeline_id)

    if is_training:
        base_seed = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, pipeline_id], tf.int64), epoch)

        def augment(position, record):
            image, label = decode(record)
            element_seed = tf.random.experimental.stateless_fold_in(
                base_seed, position)
            # Decodes only the crop window of the JPEG.
            image = _imagenet_train_image(image, element_seed, image_size)
            return _normalize(image, spec), tf.cast(label, tf.int32)

        skipped = start_step * (global_batch_size // pipelines)
        dataset = records.shuffle(spec.shuffle_buffer, seed=epoch_seed,
                                  reshuffle_each_iteration=False)
        dataset = dataset.skip(skipped).enumerate(start=skipped)
        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
    else:
        shape = (image_size, image_size, spec.image_shape[-1])

        def evaluate(record):
            image, label = decode(record)
            image = tf.ensure_shape(_eval_image(image, spec, image_size),
                                    shape)
            return image, tf.cast(label, tf.int32), tf.constant(1.0)

        dataset = records.map(evaluate, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
        # Every host runs the same number of steps of full batches.
        count = (len(indices) if indices is not None
                 else num_examples(name, split, data_dir))
        steps = -(-count // global_batch_size)
        padding = tf.data.Dataset.from_tensors(
            (tf.zeros(shape), tf.constant(0, tf.int32), tf.constant(0.0)))
        dataset = dataset.concatenate(padding.repeat()).take(
            steps * (global_batch_size // pipelines))
    dataset = dataset.batch(batch_size, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
