"""Shared behaviour of the command-line entry points: a user's mistake is one line, not a
traceback (exit code 2 for usage and input errors, 1 for a failed run)."""

from __future__ import annotations

import contextlib
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
