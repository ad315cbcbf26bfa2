"""Top-down pathway and lateral connections: the feature pyramid (paper §3, Fig. 3).

For each backbone level i (coarsest first):

    M5 = lateral5(C5)                       lateral: 1x1 conv to d channels
    Mi = upsample2x(M{i+1}) + lateral_i(Ci)  nearest neighbour, cropped to Ci's exact size
    Pi = output_i(Mi)                       3x3 conv, d channels, "to reduce aliasing"
    P6 = P5[:, ::2, ::2]                     max-pool, kernel 1, stride 2 (used by the RPN only)

No non-linearities and no normalisation, as in the paper. The Table 1 ablations:
``use_top_down=False`` (Pi = output_i(lateral_i(Ci))), ``use_lateral=False`` (only C5 gets its
1x1), ``output_levels`` and `build_fpn_model`'s ``single_scale_level`` (no pyramid).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
import tensorflow as tf

from fpn_tf.configs.experiment import FPNConfig


def upsample_nearest_to(x: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Nearest-neighbour x2 upsampling of ``x`` cropped to ``like``'s spatial size (pixel (i, j)
    takes (i // 2, j // 2), so odd sizes line up with a stride-2 backbone)."""
    up = _upsample_nearest_2x(x)
    h, w = x.shape[1], x.shape[2]
    if isinstance(h, int) and isinstance(w, int) and tuple(like.shape[1:3]) == (2 * h, 2 * w):
        return up  # statically exact (e.g. 800x1344 inputs): no crop, and no copy in backward
    size = tf.shape(like)
    return up[:, : size[1], : size[2], :]


@tf.custom_gradient
def _upsample_nearest_2x(x):
    """[B, H, W, C] -> [B, 2H, 2W, C]; the gradient sums each 2x2 block as two adds of
    contiguous halves, cheaper on CPUs than the broadcast's generic reduction."""
    shape = tf.shape(x)
    b, h, w, c = [x.shape[i] if x.shape[i] is not None else shape[i] for i in range(4)]
    # Columns then rows, each a 5-D broadcast (LiteRT's builtin ops stop at 5 dimensions).
    up = tf.broadcast_to(tf.reshape(x, [b, h, w, 1, c]), [b, h, w, 2, c])
    up = tf.broadcast_to(tf.reshape(up, [b, h, 1, w * 2, c]), [b, h, 2, w * 2, c])
    up = tf.reshape(up, [b, h * 2, w * 2, c])

    def grad(dy):
        rows = tf.reshape(dy, [b, h, 2, w * 2 * c])
        rows = rows[:, :, 0] + rows[:, :, 1]  # [B, H, 2W * C]: the two rows of each block
        cols = tf.reshape(rows, [b, h, w, 2, c])
        return cols[:, :, :, 0] + cols[:, :, :, 1]

    return up, grad


@keras.saving.register_keras_serializable(package="fpn_tf")
class FeaturePyramid(keras.layers.Layer):
    """C-maps in (dict ``{"C2".."C5"}`` or a list from ``min_level``), ``{"P2".."P6"}`` out.

    Levels above ``backbone_max_level`` (the coarsest C-map) subsample the level below;
    ``output_levels`` defaults to all. LeCun uniform is detectron2's c2_xavier_fill.
    """

    def __init__(
        self,
        num_channels: int = 256,
        min_level: int = 2,
        max_level: int = 6,
        backbone_max_level: int = 5,
        use_top_down: bool = True,
        use_lateral: bool = True,
        output_levels: Sequence[str] | None = None,
        kernel_initializer="lecun_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not min_level <= backbone_max_level <= max_level:
            raise ValueError(
                f"need min_level <= backbone_max_level <= max_level, got {min_level}, "
                f"{backbone_max_level}, {max_level}"
            )
        if not use_top_down and not use_lateral:
            raise ValueError("use_top_down=False needs the lateral 1x1 convs (use_lateral=True)")
        all_levels = [f"P{l}" for l in range(min_level, max_level + 1)]
        output_levels = list(output_levels) if output_levels else all_levels
        unknown = [name for name in output_levels if name not in all_levels]
        if unknown:
            raise ValueError(f"output_levels {unknown} not in {all_levels}")
        self.num_channels = int(num_channels)
        self.min_level = int(min_level)
        self.max_level = int(max_level)
        self.backbone_max_level = int(backbone_max_level)
        self.use_top_down = bool(use_top_down)
        self.use_lateral = bool(use_lateral)
        self.output_levels = output_levels
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        self.backbone_levels = list(range(self.min_level, self.backbone_max_level + 1))
        conv_args = dict(kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)
        # Plain attributes (lateral_P2, output_P2, ...): the checkpoint paths depend on them.
        for level in self.backbone_levels:
            name = f"lateral_P{level}"
            if self.use_lateral or level == self.backbone_max_level:
                setattr(
                    self, name, keras.layers.Conv2D(self.num_channels, 1, name=name, **conv_args)
                )
            name = f"output_P{level}"
            conv = keras.layers.Conv2D(self.num_channels, 3, padding="same", name=name, **conv_args)
            setattr(self, name, conv)
        self.subsample = keras.layers.MaxPooling2D(
            pool_size=1, strides=2, padding="valid", name="subsample", dtype=self.dtype_policy
        )

    @property
    def lateral_convs(self) -> dict:
        """level -> the 1x1 lateral conv of that level (only the top one without laterals)."""
        levels = [l for l in self.backbone_levels if hasattr(self, f"lateral_P{l}")]
        return {l: getattr(self, f"lateral_P{l}") for l in levels}

    @property
    def output_convs(self) -> dict:
        """level -> the 3x3 output conv of that level."""
        return {l: getattr(self, f"output_P{l}") for l in self.backbone_levels}

    def _as_dict(self, features):
        if isinstance(features, Mapping):
            missing = [f"C{l}" for l in self.backbone_levels if f"C{l}" not in features]
            if missing:
                raise ValueError(f"FeaturePyramid needs {missing}; got keys {sorted(features)}")
            return {l: features[f"C{l}"] for l in self.backbone_levels}
        features = list(features)
        if len(features) != len(self.backbone_levels):
            raise ValueError(
                f"FeaturePyramid needs {len(self.backbone_levels)} feature maps "
                f"(C{self.min_level}..C{self.backbone_max_level}), got {len(features)}"
            )
        return dict(zip(self.backbone_levels, features))

    def build(self, input_shape):
        shapes = self._as_dict(input_shape)
        laterals, outputs = self.lateral_convs, self.output_convs
        for level in self.backbone_levels:
            if level in laterals:
                laterals[level].build(tuple(shapes[level]))
            outputs[level].build(tuple(shapes[level])[:-1] + (self.num_channels,))
        self.built = True

    def call(self, features):
        c = self._as_dict(features)
        laterals, outputs = self.lateral_convs, self.output_convs
        top = self.backbone_max_level
        merged = {top: laterals[top](c[top])}
        for level in reversed(self.backbone_levels[:-1]):
            if not self.use_top_down:
                merged[level] = laterals[level](c[level])
            elif not self.use_lateral:
                merged[level] = upsample_nearest_to(merged[level + 1], c[level])
            else:
                lateral = laterals[level](c[level])
                merged[level] = upsample_nearest_to(merged[level + 1], lateral) + lateral
        pyramid = {f"P{l}": outputs[l](merged[l]) for l in self.backbone_levels}
        for level in range(top + 1, self.max_level + 1):
            pyramid[f"P{level}"] = self.subsample(pyramid[f"P{level - 1}"])
        return {name: pyramid[name] for name in self.output_levels}

    def compute_output_shape(self, input_shape):
        shapes = self._as_dict(input_shape)
        out = {}
        for level in range(self.min_level, self.max_level + 1):
            ref = shapes[min(level, self.backbone_max_level)]
            h, w = ref[1], ref[2]
            for _ in range(level - self.backbone_max_level):
                h = None if h is None else (h + 1) // 2
                w = None if w is None else (w + 1) // 2
            out[f"P{level}"] = (ref[0], h, w, self.num_channels)
        return {name: out[name] for name in self.output_levels}

    @property
    def strides(self) -> dict[str, int]:
        """Stride (input pixels per feature pixel) of each returned level."""
        return {name: 2 ** int(name[1:]) for name in self.output_levels}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_channels": self.num_channels,
                "min_level": self.min_level,
                "max_level": self.max_level,
                "backbone_max_level": self.backbone_max_level,
                "use_top_down": self.use_top_down,
                "use_lateral": self.use_lateral,
                "output_levels": list(self.output_levels),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config


def build_fpn_model(
    backbone: keras.Model,
    config: FPNConfig | None = None,
    input_shape: Sequence[int | None] = (None, None, 3),
    **fields,
) -> keras.Model:
    """A Functional model, RGB image (0..255) -> ``{"P2": ..., "P6": ...}``, of a ``model.fpn``
    section (``fields`` override it by name) on a built ``backbone``. ``single_scale_level``
    ("C4") gives ``{"P4": C4}``, named by stride so anchors and RoIAlign treat it as that level."""
    config = (config or FPNConfig()).override(fields).validate_section()
    images = keras.Input(shape=tuple(input_shape), name="images")
    c_maps = backbone(images)
    level = config.single_scale_level
    if level:
        if level not in backbone.output:
            raise ValueError(f"single-scale level {level!r} is not in {sorted(backbone.output)}")
        outputs = {f"P{level[1:]}": c_maps[level]}
        return keras.Model(images, outputs, name=f"single_scale_{level}_{backbone.name}")
    backbone_levels = sorted(int(k[1:]) for k in backbone.output)
    pyramid = FeaturePyramid(
        num_channels=config.num_channels,
        min_level=config.min_level,
        max_level=config.max_level,
        backbone_max_level=backbone_levels[-1],
        use_top_down=config.use_top_down,
        use_lateral=config.use_lateral,
        output_levels=config.levels_used,
        name="feature_pyramid",
    )({k: v for k, v in c_maps.items() if int(k[1:]) >= config.min_level})
    return keras.Model(images, pyramid, name=f"fpn_{backbone.name}")
