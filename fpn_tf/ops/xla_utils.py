"""Whether the op being traced is inside an XLA-compiled function."""

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import


def in_xla_context() -> bool:
    """True while tracing inside ``tf.function(jit_compile=True)`` (or a function it calls).

    Ops with a faster dynamic-shape form use it outside XLA and keep their static form inside.
    """
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
