"""Shared behaviour of the command-line entry points: `run_main` (a user's mistake is one
``error:`` line and exit code 2, `fpn_tf.errors`), TensorFlow's environment and its log noise."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

from absl import logging

from fpn_tf.errors import exit_on_user_error, fail


def reject_positional(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: every option is a --flag (see --helpfull)")


def run_main(argv, body, *args, **kwargs):
    """Every command's ``main``: ``body(*args, **kwargs)`` with TensorFlow's noise filtered and
    a user's mistake as one line and exit code 2."""
    reject_positional(argv)
    with quiet_tensorflow(), exit_on_user_error():
        return body(*args, **kwargs)


def configure_tensorflow_environment(strategy: str) -> None:
    """Environment TensorFlow must see before it is imported: oneDNN off for multi-replica
    strategies, whose concurrent CPU replicas make TF 2.20's oneDNN kernels corrupt memory
    (segfaults, heap corruption). A value the user set wins."""
    if strategy != "one_device" and "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
        if "tensorflow" in sys.modules:
            logging.warning(
                "TensorFlow is already imported: cannot turn oneDNN off for %s", strategy
            )
            return
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
        logging.info("TF_ENABLE_ONEDNN_OPTS=0 for the multi-replica strategy %s", strategy)


# TensorFlow lines that concern no user of these commands (see quiet_tensorflow).
_CUINIT_FAILED = re.compile(rb"failed call to cuInit")
_TF_NOISE = (
    # Grappler's cost model has no estimate for CropAndResize with a dynamic number of boxes (the
    # RoIAlign of inference); the graph is optimised and runs the same.
    re.compile(
        rb"op_level_cost_estimator\.cc:\d+\] Error in PredictCost\(\) for the op: op: "
        rb"\"CropAndResize\""
    ),
    # The preface absl prints before its first C++ log line.
    re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
)


def tensorflow_noise_patterns(has_nvidia_device: bool | None = None) -> list[re.Pattern]:
    """The stderr lines `quiet_tensorflow` drops; ``failed call to cuInit`` only on a machine
    without an NVIDIA device."""
    if has_nvidia_device is None:
        has_nvidia_device = os.path.exists("/dev/nvidiactl")
    return list(_TF_NOISE) + ([] if has_nvidia_device else [_CUINIT_FAILED])


@contextlib.contextmanager
def quiet_tensorflow(patterns: list[re.Pattern] | None = None):
    """Runs the block with file descriptor 2 (where TensorFlow's C++ code writes) filtered of
    exactly the `tensorflow_noise_patterns` lines; everything else passes in order. TensorFlow has
    no switch for these lines alone. ``FPN_TF_SHOW_ALL_LOGS=1`` turns the filter off."""
    if os.environ.get("FPN_TF_SHOW_ALL_LOGS", "") not in ("", "0"):
        yield
        return
    patterns = tensorflow_noise_patterns() if patterns is None else patterns
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not any(p.search(line) for p in patterns):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="quiet_tensorflow", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads to the end
        thread.join(timeout=10)
        os.close(saved)
