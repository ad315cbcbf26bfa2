"""Errors raised by the input pipeline."""

from fpn_tf.errors import UserError


class DataError(UserError, ValueError):
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


class RunTimeDrops:
    """Counts the images a pipeline drops while it runs (they fail to decode or transform).

    A data source owns one; every dataset built from it reports here, from tf.data's threads.
    Each drop is logged at once (file, image id, reason, running total); :meth:`summary` gives
    the closing line.
    """

    def __init__(self, name: str):
        import threading  # pylint: disable=g-import-not-at-top

        self.name = name
        self._lock = threading.Lock()
        self.count = 0  # drops, an image dropped in each of several epochs counted each time
        self.images: dict[str, str] = {}  # image id -> file, for the images dropped

    def record(self, file: str, image_id: str, reason: str) -> None:
        from absl import logging  # pylint: disable=g-import-not-at-top

        with self._lock:
            self.count += 1
            self.images.setdefault(str(image_id), file)
            total = self.count
        logging.warning(
            "%s: dropped image id %s (%s): it fails at run time (%s) [%d dropped so far]",
            self.name,
            image_id,
            file,
            reason,
            total,
        )

    def summary(self) -> str | None:
        """One line for the end of a run, or None when nothing was dropped."""
        with self._lock:
            if not self.count:
                return None
            listed = ", ".join(f"{i} ({f})" for i, f in list(self.images.items())[:10])
            more = ", ..." if len(self.images) > 10 else ""
            return (
                f"{self.name}: {self.count} run-time drop(s) of {len(self.images)} image(s) "
                f"that fail to decode: {listed}{more}"
            )
