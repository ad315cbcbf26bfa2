"""Shared behaviour of the command-line entry points: a user's mistake is one line, not a
traceback (exit code 2 for usage and input errors, 1 for a failed run)."""

from __future__ import annotations

import contextlib
import os
import sys

from absl import logging


def fail(message: str, code: int = 2):
    logging.error(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def reject_positional(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: every option is a --flag (see --helpfull)")


@contextlib.contextmanager
def user_errors():
    """Turns the errors a user causes (bad config, bad data, missing files) into one line."""
    from fpn_tf.configs.experiment import ConfigError
    from fpn_tf.data.errors import DataError
    from fpn_tf.training.trainer import CheckpointError, NonFiniteLossError

    try:
        yield
    except (ConfigError, DataError) as e:
        fail(f"{type(e).__name__}: {e}")
    except (NonFiniteLossError, CheckpointError) as e:
        fail(str(e), code=1)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        fail(f"{type(e).__name__}: {e}")


def configure_tensorflow_environment(strategy: str) -> None:
    """Environment TensorFlow must see before it is imported.

    With several replicas running concurrently on the CPU (mirrored over logical CPU devices,
    multi-worker on CPU machines), TensorFlow 2.20's oneDNN CPU kernels corrupt memory: we saw a
    segfault or heap corruption in about one run in four, and a garbage gradient once. Turning
    oneDNN off for those runs fixes it (it affects CPU kernels only). A value the user set wins.
    """
    if strategy != "one_device" and "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
        if "tensorflow" in sys.modules:
            logging.warning(
                "TensorFlow is already imported: cannot turn oneDNN off for %s", strategy
            )
            return
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
        logging.info("TF_ENABLE_ONEDNN_OPTS=0 for the multi-replica strategy %s", strategy)
