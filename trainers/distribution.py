"""Distribution strategies selected by `--strategy`, failing fast and clearly."""

import glob
import json
import os
import socket

import tensorflow as tf

# Seconds for each network step of reaching a TPU.
_TPU_TIMEOUT_S = 10

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


def has_gpus():
    return bool(tf.config.list_logical_devices("GPU"))


def _check_reachable(endpoint):
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host, int(port)),
                                  timeout=_TPU_TIMEOUT_S):
        pass


def _connect_tpu(tpu):
    """Resolves, reaches and initialises the TPU; its cluster resolver.

    Every failure on the way (an unknown name, no metadata server or Cloud
    TPU API, an unreachable worker, a failed initialisation) becomes one
    StrategyError that names the TPU and what to check, within seconds: each
    network step has a timeout, and the TPU workers are probed before the
    runtime, whose own connection attempts retry for minutes.
    """
    label = tpu or os.environ.get("TPU_NAME") or "local"
    previous_timeout = socket.getdefaulttimeout()
    # The Cloud TPU client's metadata and API requests have no timeout.
    socket.setdefaulttimeout(_TPU_TIMEOUT_S)
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        for endpoints in resolver.cluster_spec().as_dict().values():
            for endpoint in endpoints:
                _check_reachable(endpoint)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as error:  # noqa: BLE001: the resolver raises anything
        reason = (str(error).strip().splitlines() or [""])[0]
        raise StrategyError(
            f"--strategy=tpu could not reach or initialise TPU '{label}' "
            f"({type(error).__name__}: {reason}). Check that the TPU exists "
            "and is READY (`gcloud compute tpus tpu-vm list`) in this "
            "project and zone, that this machine can reach it (a TPU VM, or a "
            "VM in the TPU's network; a name is looked up through the GCE "
            "metadata server and the Cloud TPU API), or pass "
            "--tpu=grpc://HOST:8470, or --tpu=local on a TPU VM."
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return resolver


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
        return tf.distribute.TPUStrategy(_connect_tpu(tpu))
    if name == "mirrored":
        if has_gpus():
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
