"""Test setup: two logical CPU devices so MirroredStrategy has 2 replicas.

Logical devices must be configured before TensorFlow initialises its
runtime, hence at import time of the test session.
"""

import fcntl
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def two_replicas():
    """One MirroredStrategy over the 2 logical CPUs for the whole session.

    Separate MirroredStrategy objects in one process reuse collective
    instance keys, and the runtime rejects the second one's shapes.
    """
    return tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """Fashion-MNIST prepared through tfds from the Debian files, once.

    Under pytest-xdist (scripts/test.sh runs two workers) the workers share
    one copy in their common temporary folder: the first to take the lock
    prepares it, the others find it prepared.
    """
    from clars_tf.trainers import data

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    with open(shared / "tensorflow_datasets.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data_dir = str(shared / "tensorflow_datasets")
        data.prepare("fashion_mnist", data_dir)
    return data_dir
