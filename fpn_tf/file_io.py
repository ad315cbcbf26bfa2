"""Small file helpers shared by configs, data and evaluation (no TensorFlow unless remote)."""

from __future__ import annotations

import os


def write_text(directory: str, filename: str, text: str) -> str:
    """Writes ``text`` to ``directory/filename`` and returns the path.

    Local files are written to a temporary name and renamed, so a reader never sees half a file;
    remote paths (``gs://`` and other ``scheme://``) go through ``tf.io.gfile``.
    """
    if "://" in directory:
        import tensorflow as tf  # only for remote file systems

        tf.io.gfile.makedirs(directory)
        path = directory.rstrip("/") + "/" + filename
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
        return path
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
