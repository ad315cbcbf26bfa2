"""Where each PyTorch weight goes in our detector, and how its layout changes on the way.

Each change is exact: conv kernels ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]`` (a transposed
conv's ``[in, out, kh, kw]`` -> ``[kh, kw, out, in]`` is the same permutation, no spatial flip);
linear ``[out, in]`` -> ``[in, out]``; box deltas ``(dx, dy, dw, dh)`` -> ours ``(dy, dx, dh,
dw)``; the first box-head fc's inputs from torch's ``[C, S, S]`` flattening to ours ``[S, S, C]``;
output channels picked or reordered, one the source lacks set to zeros. `Assignments` checks
every shape before anything is written.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

from fpn_tf.conversion.checkpoint_reader import ConversionError, StateDict
from fpn_tf.modeling.frozen_batch_norm import Conv2DFrozenBatchNorm

# Ours is (dy, dx, dh, dw); theirs (dx, dy, dw, dh): our coordinate k is their DELTA_ORDER[k].
DELTA_ORDER = (1, 0, 3, 2)
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    return np.transpose(weight, (2, 3, 1, 0))


# torch ConvTranspose2d [in, out, kh, kw] -> Keras Conv2DTranspose [kh, kw, out, in]: no flip.
transposed_conv_kernel = conv_kernel


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    return np.transpose(weight, (1, 0))


def delta_rows(num_groups: int) -> np.ndarray:
    """Indices into theirs of each of our ``4 * num_groups`` delta outputs."""
    return np.array([4 * g + DELTA_ORDER[k] for g in range(num_groups) for k in range(4)])


def flattened_roi_kernel(weight: np.ndarray, channels: int, size: int) -> np.ndarray:
    """The first box-head fc: torch ``[out, C*S*S]`` (C, H, W order) -> ours ``[S*S*C, out]``."""
    out = weight.shape[0]
    if weight.shape[1] != channels * size * size:
        return dense_kernel(weight)  # the shape check reports the mismatch
    return weight.reshape(out, channels, size, size).transpose(2, 3, 1, 0).reshape(-1, out)


class Assignments:
    """Pending ``variable <- array`` writes, each with the checkpoint key it came from."""

    def __init__(self, state: StateDict):
        self.state = state
        self.pending: list[tuple[keras.Variable, np.ndarray, str]] = []
        self.wrong: list[str] = []

    def add(self, variable, key: str, transform=None, array: np.ndarray | None = None) -> None:
        """Queues ``variable <- transform(state[key])`` (or ``array`` when given)."""
        value = self.state.take(key) if array is None else array
        if value is None:
            return  # recorded as missing by the state dict
        if transform is not None:
            try:
                value = transform(value)
            except (IndexError, ValueError) as e:  # e.g. fewer classifier rows than classes
                self.wrong.append(f"{key} {tuple(value.shape)} -> {variable.path}: {e}")
                return
        self.pending.append((variable, value, key))

    def check_and_assign(self, what: str, model=None) -> int:
        """Checks keys, shapes and (given ``model``) that every weight gets a value, then
        assigns; returns #values."""
        self.state.check_all_used(what)
        if model is not None:
            queued = {id(variable) for variable, _, _ in self.pending}
            unset = [v.path for v in model.weights if id(v) not in queued]
            if unset and not self.wrong:
                raise ConversionError(
                    f"{self.state.path}: {len(unset)} weights of the model would keep their "
                    f"initial values ({', '.join(unset[:3])}{', ...' if len(unset) > 3 else ''}): "
                    f"the {what} conversion does not cover this architecture"
                )
        wrong = self.wrong + [
            f"{key} {tuple(value.shape)} -> {variable.path} {tuple(variable.shape)}"
            for variable, value, key in self.pending
            if tuple(value.shape) != tuple(variable.shape)
        ]
        if wrong:
            shown = "; ".join(wrong[:3]) + (
                f"; ... ({len(wrong)} in all)" if len(wrong) > 3 else ""
            )
            raise ConversionError(
                f"{self.state.path} does not fit this architecture ({what}): shapes {shown}"
            )
        for variable, value, _ in self.pending:
            variable.assign(value.astype(np.float32))
        return int(sum(value.size for _, value, _ in self.pending))


def backbone_model(model) -> keras.Model:
    """The bottom-up ResNet inside the detector's pyramid model."""
    for layer in model.fpn.layers:
        if isinstance(layer, keras.Model) and "C5" in layer.output:
            return layer
    raise ConversionError("the detector has no bottom-up backbone model with C2..C5")


def add_conv_bn(
    out: Assignments, backbone: keras.Model, name: str, conv_key: str, bn_prefix: str
) -> None:
    """A bias-free torch conv + BatchNorm into our ``{name}_conv`` (bias 0) + ``{name}_bn`` (or
    the folded conv's vectors)."""
    conv = backbone.get_layer(f"{name}_conv")
    out.add(conv.kernel, conv_key, conv_kernel)
    if conv.use_bias:
        out.add(conv.bias, conv_key, array=np.zeros(conv.bias.shape, np.float32))
    bn = conv if isinstance(conv, Conv2DFrozenBatchNorm) else backbone.get_layer(f"{name}_bn")
    for ours, theirs in (
        ("gamma", "weight"),
        ("beta", "bias"),
        ("moving_mean", "running_mean"),
        ("moving_variance", "running_var"),
    ):
        out.add(getattr(bn, ours), f"{bn_prefix}{theirs}")


def add_resnet(out: Assignments, model, backbone_type: str, stem, block) -> None:
    """Every conv + BatchNorm of the ResNet. ``stem() -> (conv_key, bn_prefix)`` and
    ``block(stage, index, conv) -> (conv_key, bn_prefix)`` spell the source's keys (stage 2..5,
    index from 0, conv 0 = the projection shortcut, 1..3 the bottleneck's convs)."""
    if backbone_type not in RESNET_BLOCKS:
        raise ConversionError(
            f"model.backbone.type {backbone_type!r} cannot take these weights "
            f"(one of {sorted(RESNET_BLOCKS)})"
        )
    backbone = backbone_model(model)
    add_conv_bn(out, backbone, "conv1", *stem())
    for stage, count in zip(range(2, 6), RESNET_BLOCKS[backbone_type]):
        for index in range(count):
            for conv in (0, 1, 2, 3) if index == 0 else (1, 2, 3):
                name = f"conv{stage}_block{index + 1}_{conv}"
                add_conv_bn(out, backbone, name, *block(stage, index, conv))


def pick_rows(rows: Sequence[int | None] | None):
    """``array -> array[rows]`` (None = unchanged); a None row is zeros."""
    if rows is None:
        return lambda a: a
    index = np.array([0 if r is None else r for r in rows], dtype=np.int64)
    absent = np.array([r is None for r in rows])

    def pick(a: np.ndarray) -> np.ndarray:
        picked = a[index]
        if absent.any():
            picked = picked.copy()
            picked[absent] = 0
        return picked

    return pick


def add_conv(out: Assignments, layer, prefix: str, rows=None, kernel=conv_kernel) -> None:
    """A torch conv (or, with ``kernel=dense_kernel``, linear) with bias; ``rows``: `pick_rows`."""
    pick = pick_rows(rows)
    out.add(layer.kernel, prefix + "weight", lambda w: kernel(pick(w)))
    out.add(layer.bias, prefix + "bias", pick)


def add_dense(out: Assignments, layer, prefix: str, rows=None) -> None:
    add_conv(out, layer, prefix, rows, kernel=dense_kernel)


def add_pyramid_and_rpn(out: Assignments, model, lateral, output, rpn_conv, rpn_logits, rpn_deltas):
    """The FPN's laterals and outputs (``lateral(level)`` / ``output(level)``: key prefixes) and
    the RPN head."""
    pyramid = model.fpn.get_layer("feature_pyramid")
    for level, conv in pyramid.lateral_convs.items():
        add_conv(out, conv, lateral(level))
    for level, conv in pyramid.output_convs.items():
        add_conv(out, conv, output(level))
    head = model.rpn.head
    add_conv(out, head.conv, rpn_conv)
    add_conv(out, head.objectness, rpn_logits)
    add_conv(out, head.box_deltas, rpn_deltas, rows=delta_rows(model.rpn.num_anchors))


def add_box_head(out: Assignments, model, fc_prefixes: Sequence[str]) -> None:
    """The box head's hidden fc layers (the first one's input rows reordered to ours)."""
    box_head = model.roi_heads.box_head
    if len(fc_prefixes) != box_head.num_fc:
        raise ConversionError(
            f"the checkpoint's box head has {len(fc_prefixes)} fc layers, the config "
            f"model.box_head.num_fc {box_head.num_fc}"
        )
    size = model.roi_heads.box_pooler.config.output_size
    channels = int(box_head.fc1.kernel.shape[0]) // size**2
    for i, prefix in enumerate(fc_prefixes):
        fc = getattr(box_head, f"fc{i + 1}")
        if i == 0:
            out.add(fc.kernel, prefix + "weight", lambda w: flattened_roi_kernel(w, channels, size))
        else:
            out.add(fc.kernel, prefix + "weight", dense_kernel)
        out.add(fc.bias, prefix + "bias")


def add_mask_head(
    out: Assignments, model, conv_prefixes, deconv_prefix, predictor_prefix, predictor_rows=None
) -> None:
    """The mask head's convs, transposed conv and predictor (``predictor_rows``: `pick_rows`)."""
    head = model.roi_heads.mask_head
    if len(conv_prefixes) != head.num_convs:
        raise ConversionError(
            f"the checkpoint's mask head has {len(conv_prefixes)} convs, the config "
            f"model.mask_head.num_convs {head.num_convs}"
        )
    for i, prefix in enumerate(conv_prefixes):
        add_conv(out, getattr(head, f"conv{i + 1}"), prefix)
    add_conv(out, head.deconv, deconv_prefix, kernel=transposed_conv_kernel)
    add_conv(out, head.predictor, predictor_prefix, rows=predictor_rows)
