"""`UserError`, the base of every error a user causes and can fix, and the one handler that turns
such an error into one line and exit code 2 (a leaf module: every layer may import it)."""

from __future__ import annotations

import contextlib
import sys

from absl import logging


class UserError(Exception):
    """A mistake the user can fix (a config key, flag, data file, model directory); the message
    is one line saying what is wrong and where."""


# What a user's mistake raises: our errors and the file system's.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, PermissionError)


def fail(message: str, code: int = 2):
    """Logs ``message``, prints ``error: <message>`` to stderr and exits with ``code``."""
    logging.error(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def exit_on_user_error():
    """A `USER_ERRORS` exception in the block is one ``error:`` line and exit code 2; any other
    is a bug and keeps its traceback."""
    try:
        yield
    except USER_ERRORS as e:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if not isinstance(e, UserError) or not message:
            message = f"{type(e).__name__}: {message}"
        fail(message)


def parse_flags(argv):
    """absl's flag parsing for ``app.run(main, flags_parser=parse_flags)``: an unknown, missing
    or bad flag is one ``error:`` line and exit code 2 (absl's own parser exits 1)."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message} (see --helpfull)", file=sys.stderr, flush=True)
        sys.exit(2)
