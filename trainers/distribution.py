"""Distribution strategies selected by `--strategy`, failing fast and clearly."""

import glob
import json
import os

import tensorflow as tf

STRATEGIES = ("tpu", "mirrored", "multi_worker_mirrored", "one_device",
              "default")


class StrategyError(RuntimeError):
    """The requested strategy cannot run here; the message says why."""


def split_cpu(num_devices):
    """Splits the CPU into logical devices (to run mirrored on one machine).

    Must run before TensorFlow initialises its runtime.
    """
    if num_devices <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as error:
        raise StrategyError(
            f"--cpu_devices={num_devices} must be set before TensorFlow "
            f"starts: {error}") from None


def _tpu_visible(tpu):
    if tpu:
        return True
    return bool(os.environ.get("TPU_NAME") or glob.glob("/dev/accel*")
                or glob.glob("/dev/vfio/[0-9]*"))


def create(name, tpu=""):
    """Returns the `tf.distribute.Strategy` called `name`.

    Args:
        name: one of `STRATEGIES`.
        tpu: `--tpu`: a TPU name, `grpc://host:port` or `local`.
    """
    if name not in STRATEGIES:
        raise StrategyError(
            f"--strategy={name} is unknown; choose one of "
            f"{', '.join(STRATEGIES)}.")
    if name == "tpu":
        # Without a TPU name or local TPU device there is nothing to connect
        # to; checking first avoids the resolver's slow metadata lookups.
        if not _tpu_visible(tpu):
            raise StrategyError(
                "--strategy=tpu but no TPU is reachable: no --tpu given, no "
                "TPU_NAME set and no local TPU device. Pass --tpu=NAME (or "
                "grpc://HOST:8470), or use --strategy=mirrored/one_device.")
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
                tpu=tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            raise StrategyError(
                f"--strategy=tpu could not connect to TPU '{tpu}': {error}"
            ) from None
        return tf.distribute.TPUStrategy(resolver)
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        # Without GPUs, mirror over the logical CPUs of --cpu_devices.
        return tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")])
    if name == "multi_worker_mirrored":
        if "TF_CONFIG" in os.environ:
            try:
                json.loads(os.environ["TF_CONFIG"])
            except ValueError as error:
                raise StrategyError(
                    f"TF_CONFIG is not valid JSON: {error}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(
            gpus[0].name if gpus else "/cpu:0")
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """Whether this task writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in
                                    resolver.cluster_spec().as_dict())


def task_id(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return getattr(resolver, "task_id", 0) or 0
