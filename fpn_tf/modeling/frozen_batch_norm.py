"""Frozen BatchNorm folded into the convolution before it.

A frozen BatchNorm is the affine map ``x * scale + offset``, ``scale = gamma /
sqrt(moving_variance + epsilon)``, ``offset = beta - moving_mean * scale`` (torchvision's
``FrozenBatchNorm2d``), so ``BN(conv(x, K) + b) = conv(x, K * scale) + (b * scale + offset)``:
one convolution that TensorFlow fuses with bias and ReLU, with no BatchNorm backward. The fold
runs inside ``call``, so kernel and bias stay the trained parameters (same gradients and weight
decay as the unfolded pair).
"""

from __future__ import annotations

import keras

__all__ = ["Conv2DFrozenBatchNorm", "fold_frozen_batch_norm"]


@keras.saving.register_keras_serializable(package="fpn_tf")
class Conv2DFrozenBatchNorm(keras.layers.Conv2D):
    """``Conv2D`` then a frozen ``BatchNormalization`` (``epsilon``, and non-trainable ``gamma``,
    ``beta``, ``moving_mean``, ``moving_variance``) as one convolution."""

    def __init__(self, *args, epsilon: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        super().build(input_shape)

        # autocast=False: under a mixed policy the fold is computed in float32 (as BatchNorm is).
        def vector(name, init):
            return self.add_weight(
                shape=(self.filters,), initializer=init, name=name, trainable=False, autocast=False
            )

        self.gamma = vector("gamma", "ones")
        self.beta = vector("beta", "zeros")
        self.moving_mean = vector("moving_mean", "zeros")
        self.moving_variance = vector("moving_variance", "ones")

    def folded_scale_and_offset(self):
        """float32 ``(scale, offset)`` of the BatchNorm (and conv bias) as one affine map."""
        ops = keras.ops
        scale = self.gamma * ops.rsqrt(self.moving_variance + self.epsilon)
        offset = self.beta - self.moving_mean * scale
        if self.use_bias:
            offset = offset + ops.cast(self.bias, "float32") * scale
        return scale, offset

    def call(self, inputs):
        ops = keras.ops
        scale, offset = self.folded_scale_and_offset()
        kernel = self.kernel * ops.cast(scale, self.kernel.dtype)  # [kh, kw, in, out] * [out]
        outputs = self.convolution_op(inputs, kernel)
        outputs = ops.add(outputs, ops.cast(offset, outputs.dtype))
        return outputs if self.activation is None else self.activation(outputs)

    # Conv2D saves only kernel and bias (its override handles quantised kernels); the plain Layer
    # behaviour saves and loads every variable, the BatchNorm vectors included.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    def get_config(self):
        config = super().get_config()
        config["epsilon"] = self.epsilon
        return config


def _identity(x, *args, **kwargs):
    del args, kwargs
    return x


def _frozen_bn_after_conv(model: keras.Model) -> dict:
    """``{conv layer name: BatchNormalization}`` for every non-trainable BatchNorm whose input
    is the output of a plain ``Conv2D`` (channels-last, no activation) used only by it."""
    consumers: dict = {}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                producer = tensor._keras_history.operation
                consumers.setdefault(id(producer), set()).add(id(layer))
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or layer.trainable:
            continue
        if len(layer._inbound_nodes) != 1 or layer.axis not in (-1, 3):
            continue
        conv = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
        if (
            type(conv) is keras.layers.Conv2D
            and conv.data_format == "channels_last"
            and conv.activation is keras.activations.linear
            and conv.groups == 1
            and consumers.get(id(conv)) == {id(layer)}
            and len(conv._inbound_nodes) == 1
        ):
            pairs[conv.name] = layer
    return pairs


def fold_frozen_batch_norm(model: keras.Model) -> tuple[keras.Model, int]:
    """``(copy of the Functional model, pairs folded)``: each ``Conv2D -> frozen BatchNorm`` pair
    becomes one ``Conv2DFrozenBatchNorm`` named as the conv; other layers are cloned with their
    weights and ``trainable`` flags."""
    pairs = _frozen_bn_after_conv(model)
    folded_bn = {bn.name for bn in pairs.values()}

    def clone(layer):
        if layer.name in folded_bn:
            return _identity  # its work now happens inside the folded convolution
        config = layer.get_config()
        if layer.name in pairs:
            config["epsilon"] = pairs[layer.name].epsilon
            return Conv2DFrozenBatchNorm.from_config(config)
        return layer.__class__.from_config(config)

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in new.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        source = model.get_layer(layer.name)
        if layer.name in pairs:
            bn = pairs[layer.name]
            layer.kernel.assign(source.kernel)
            if layer.use_bias:
                layer.bias.assign(source.bias)
            for name in ("gamma", "beta", "moving_mean", "moving_variance"):
                value = getattr(bn, name)
                if value is not None:  # BatchNormalization(scale=False / center=False)
                    getattr(layer, name).assign(value)
        else:
            layer.set_weights(source.get_weights())
        layer.trainable = source.trainable
    return new, len(pairs)
