"""Errors raised by the input pipeline."""


class DataError(ValueError):
  """A dataset is malformed or holds data the pipeline cannot use.

  The message is one line and names the file (and, where there is one, the
  annotation or image id) and what is wrong, so that it can be fixed at the
  source.
  """
