"""The tf.distribute strategy of a ``runtime`` config: one device, mirrored, multi-worker."""

from __future__ import annotations

from absl import logging
import tensorflow as tf


def split_cpu(num_devices: int) -> None:
    """Splits the CPU into ``num_devices`` logical devices, before TensorFlow initialises them
    (a repeated call with the same number is a no-op)."""
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == num_devices:
        return
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
    )


def build_strategy(runtime_cfg) -> tf.distribute.Strategy:
    if runtime_cfg.num_logical_cpu_devices:
        split_cpu(runtime_cfg.num_logical_cpu_devices)
    devices = runtime_cfg.devices
    if runtime_cfg.strategy == "one_device":
        if not devices:
            devices = ["/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"]
        strategy = tf.distribute.OneDeviceStrategy(devices[0])
    elif runtime_cfg.strategy == "mirrored":
        if not devices and not tf.config.list_logical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif runtime_cfg.strategy == "multi_worker_mirrored":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise ValueError(
            f"runtime.strategy {runtime_cfg.strategy!r} is not one of one_device, "
            "mirrored, multi_worker_mirrored"
        )
    logging.info(
        "Strategy %s with %d replica(s): %s",
        type(strategy).__name__, strategy.num_replicas_in_sync, strategy.extended.worker_devices,
    )  # fmt: skip
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return (
        task_type is None
        or task_type == "chief"
        or (task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().jobs)
    )
