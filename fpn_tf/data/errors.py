"""Errors raised by the input pipeline."""

from fpn_tf.errors import UserError


class DataError(UserError, ValueError):
    """A malformed dataset: a one-line message naming the file (and id) and what is wrong."""


def parse_json(text: str, source: str):
    """``json.loads`` whose failure is a one-line DataError naming ``source``."""
    import json  # pylint: disable=g-import-not-at-top

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from e


def read_json(path: str, what: str):
    """A parsed JSON file; a missing file or bad JSON is a one-line DataError naming ``path``."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        with tf.io.gfile.GFile(path, "r") as f:
            text = f.read()
    except tf.errors.NotFoundError as e:
        raise DataError(f"{path}: {what} not found") from e
    return parse_json(text, path)


class RunTimeDrops:
    """Counts (thread-safely) and logs the images a data source's pipelines drop at run time."""

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
