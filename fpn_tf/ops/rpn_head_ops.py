"""The RPN head on one pyramid level, with a backward pass over the positions the loss reaches.

The RPN loss reads only the sampled anchors, so the gradient at the head's outputs is zero almost
everywhere. This backward computes it at the N positions where it is not: filter gradient
``patches^T @ d_pre`` (N x 9C patches of x), input gradient ``d_pre @ W^T`` scattered over the 3x3
neighbourhoods. It equals the dense gradient up to summation order; outside XLA only (N is
data-dependent).
"""

from __future__ import annotations

import tensorflow as tf

from fpn_tf.ops.xla_utils import in_xla_context

# (batch, dy, dx) offsets of a 3x3 window, dy-major: the row order of a [3, 3, C, K] kernel
# reshaped to [9C, K].
_WINDOW = [[0, dy, dx] for dy in range(3) for dx in range(3)]


def _forward(x, conv_kernel, conv_bias, cls_kernel, cls_bias, box_kernel, box_bias):
    hidden = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, conv_kernel, 1, "SAME"), conv_bias))
    logits = tf.nn.bias_add(tf.nn.conv2d(hidden, cls_kernel, 1, "VALID"), cls_bias)
    deltas = tf.nn.bias_add(tf.nn.conv2d(hidden, box_kernel, 1, "VALID"), box_bias)
    return hidden, logits, deltas


@tf.custom_gradient
def _head_sparse_backward(x, conv_kernel, conv_bias, cls_kernel, cls_bias, box_kernel, box_bias):
    hidden, logits, deltas = _forward(
        x, conv_kernel, conv_bias, cls_kernel, cls_bias, box_kernel, box_bias
    )

    def grad(d_logits, d_deltas):
        channels = tf.shape(x)[-1]
        width = tf.shape(conv_kernel)[-1]
        num_anchors = tf.shape(cls_kernel)[-1]
        # Positions [N, 3] = (b, y, x) where any output channel receives a gradient.
        reached = tf.logical_or(
            tf.reduce_any(tf.not_equal(d_logits, 0), axis=-1),
            tf.reduce_any(tf.not_equal(d_deltas, 0), axis=-1),
        )
        positions = tf.cast(tf.where(reached), tf.int32)
        g_logits = tf.gather_nd(d_logits, positions)  # [N, A]
        g_deltas = tf.gather_nd(d_deltas, positions)  # [N, 4A]
        h = tf.gather_nd(hidden, positions)  # [N, K]
        cls_matrix = tf.reshape(cls_kernel, [width, num_anchors])
        box_matrix = tf.reshape(box_kernel, [width, 4 * num_anchors])
        d_cls_kernel = tf.reshape(tf.matmul(h, g_logits, transpose_a=True), tf.shape(cls_kernel))
        d_box_kernel = tf.reshape(tf.matmul(h, g_deltas, transpose_a=True), tf.shape(box_kernel))
        d_hidden = tf.matmul(g_logits, cls_matrix, transpose_b=True) + tf.matmul(
            g_deltas, box_matrix, transpose_b=True
        )
        d_pre = d_hidden * tf.cast(h > 0, d_hidden.dtype)  # ReLU: mask of the forward
        # 3x3 windows of the zero-padded input around each position (padded coordinates: the
        # window of output (y, x) starts at padded (y, x)).
        padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        windows = positions[:, None, :] + tf.constant(_WINDOW, tf.int32)[None]  # [N, 9, 3]
        patches = tf.reshape(tf.gather_nd(padded, windows), [-1, 9 * channels])  # [N, 9C]
        conv_matrix = tf.reshape(conv_kernel, [9 * channels, width])
        d_conv_kernel = tf.reshape(
            tf.matmul(patches, d_pre, transpose_a=True), tf.shape(conv_kernel)
        )
        d_patches = tf.reshape(tf.matmul(d_pre, conv_matrix, transpose_b=True), [-1, 9, channels])
        d_padded = tf.scatter_nd(windows, d_patches, tf.shape(padded))  # sums overlapping windows
        d_x = d_padded[:, 1:-1, 1:-1, :]
        d_biases = [tf.reduce_sum(g, 0) for g in (d_pre, g_logits, g_deltas)]
        return (
            d_x,
            d_conv_kernel,
            d_biases[0],
            d_cls_kernel,
            d_biases[1],
            d_box_kernel,
            d_biases[2],
        )

    return (logits, deltas), grad


def rpn_head_level(
    x, conv_kernel, conv_bias, cls_kernel, cls_bias, box_kernel, box_bias, sparse_backward=True
):
    """3x3 conv + ReLU, then 1x1 objectness and box-delta convs, on one level ``x [B,H,W,C]``.

    Kernels as Keras ``Conv2D`` keeps them: ``conv_kernel [3,3,C,K]``, ``cls_kernel [1,1,K,A]``,
    ``box_kernel [1,1,K,4A]``, biases ``[K]``, ``[A]``, ``[4A]``. Returns ``(logits [B,H,W,A],
    deltas [B,H,W,4A])``. ``sparse_backward``: the gradient over the positions the loss reaches
    (see the module docstring); ignored (dense) inside XLA.
    """
    args = (x, conv_kernel, conv_bias, cls_kernel, cls_bias, box_kernel, box_bias)
    if sparse_backward and not in_xla_context():
        return _head_sparse_backward(*args)
    _, logits, deltas = _forward(*args)
    return logits, deltas
