"""Errors raised by the input pipeline."""


class DataError(ValueError):
    """A dataset is malformed or holds data the pipeline cannot use.

    The message is one line and names the file (and, where there is one, the
    annotation or image id) and what is wrong, so that it can be fixed at the
    source.
    """


def parse_json(text: str, source: str):
    """``json.loads`` whose failure is a one-line DataError naming ``source``."""
    import json  # pylint: disable=g-import-not-at-top

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{source}: not valid JSON ({e.msg} at line {e.lineno} column " f"{e.colno})"
        ) from e


def read_json(path: str, what: str):
    """Reads and parses a JSON file (local or remote); a missing file or bad
    JSON is a one-line DataError naming ``path`` (``what``: "annotation file")."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        with tf.io.gfile.GFile(path, "r") as f:
            text = f.read()
    except tf.errors.NotFoundError as e:
        raise DataError(f"{path}: {what} not found") from e
    return parse_json(text, path)
