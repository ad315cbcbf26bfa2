"""Typed experiment configuration for FPN Faster R-CNN.

An experiment is a tree of plain dataclasses whose defaults are the paper's numbers (Lin et al.,
CVPR 2017, §4-5; DESIGN.md §2) and detectron2's "1x" COCO schedule. A run's configuration is
resolved in three layers, as in TF Model Garden:

    ExperimentConfig()  ->  YAML file(s)  ->  params_override ("train.learning_rate=0.01,...")

(see :mod:`fpn_tf.configs.loader`). Every layer is checked as it is applied:

* an unknown key raises :class:`ConfigError` naming the full dotted key and the nearest valid one;
* a value of the wrong type raises :class:`ConfigError` naming the key, the expected type and the
  value (``int`` is accepted where a ``float`` is expected, nothing else is converted);
* :meth:`ExperimentConfig.validate` rejects impossible values (negative learning rate, IoU outside
  [0, 1], ``min_level > max_level``, a batch not divisible by the replicas, ...) naming the key.

The whole resolved tree round-trips through :meth:`Config.to_dict` / :meth:`Config.from_dict` and
YAML, so a run writes it to ``model_dir`` and can be reproduced from that file alone.

This module depends on the standard library and PyYAML only (no TensorFlow, no Keras), so configs
load in milliseconds in tools and tests.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import glob
import os
import typing
from typing import Any, Dict, List, Literal, Mapping, Optional

import yaml

__all__ = [
    "ConfigError",
    "Config",
    "BackboneConfig",
    "FPNConfig",
    "AnchorConfig",
    "RPNConfig",
    "RoIConfig",
    "DetectionConfig",
    "ModelConfig",
    "SyntheticDataConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "RuntimeConfig",
    "ExperimentConfig",
]


class ConfigError(ValueError):
    """An invalid configuration. ``key`` is the full dotted key at fault (or None)."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------------------------
# Generic machinery: type checking, overrides, suggestions.
# --------------------------------------------------------------------------------------------

_NoneType = type(None)


def _list(*values):
    """A dataclass field defaulting to a fresh list."""
    return dataclasses.field(default_factory=lambda: list(values))


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _type_name(tp) -> str:
    """A readable name for a type annotation, e.g. 'list[int]', 'float or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not _NoneType]
        name = " or ".join(names)
        return name + " or null" if _NoneType in args else name
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, List):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, tp, value) -> ConfigError:
    return ConfigError(
        f"Config key '{key}' expects {_type_name(tp)}, got {value!r} "
        f"(type {type(value).__name__}).",
        key=key,
    )


def _coerce(value, tp, key: str):
    """Checks `value` against the annotation `tp`; returns it (ints widened to float, tuples to lists).

    Nested mappings become dataclass instances (defaults filled in, strictly checked).
    """
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            value._check_types(key + ".")
            return value
        if isinstance(value, Mapping):
            return tp()._apply(value, key + ".")
        raise _type_error(key, tp, value)
    if origin is typing.Union:
        if value is None and _NoneType in args:
            return None
        options = [a for a in args if a is not _NoneType]
        if len(options) == 1 and typing.get_origin(options[0]) is Literal:
            return _check_literal(value, typing.get_args(options[0]), key, nullable=True)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise _type_error(key, tp, value)
    if origin is Literal:
        return _check_literal(value, args, key, nullable=False)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        item_type = args[0] if args else Any
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    raise TypeError(f"Unsupported annotation {tp!r} for config key '{key}'.")  # programming error


def _check_literal(value, allowed_values, key: str, nullable: bool):
    # `True == 1` in Python: compare types too so that e.g. `1` does not pass for `True`.
    for allowed in allowed_values:
        if type(value) is type(allowed) and value == allowed:
            return value
    choices = ", ".join(repr(a) for a in allowed_values) + (" or null" if nullable else "")
    message = f"Config key '{key}' must be one of {choices}; got {value!r}."
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [a for a in allowed_values if isinstance(a, str)], 1, 0.5)
        if close:
            message += f" Did you mean {close[0]!r}?"
    raise ConfigError(message, key=key)


def _first_leaf(mapping: Mapping) -> str:
    """The dotted path of the first leaf of a nested mapping ('' when it has none)."""
    for name, value in mapping.items():
        if isinstance(value, Mapping) and value:
            return f"{name}.{_first_leaf(value)}"
        return str(name)
    return ""


def _expand_dotted(mapping: Mapping, key_prefix: str = "") -> Dict[str, Any]:
    """{'a.b': 1, 'a': {'c': 2}} -> {'a': {'b': 1, 'c': 2}} (later entries win on conflicts)."""
    out: Dict[str, Any] = {}
    for raw_key, value in mapping.items():
        if not isinstance(raw_key, str) or not raw_key.strip():
            raise ConfigError(
                f"Config keys must be non-empty strings; got {raw_key!r} under "
                f"'{key_prefix.rstrip('.') or '<root>'}'.",
                key=key_prefix + str(raw_key),
            )
        parts = [p.strip() for p in raw_key.strip().split(".")]
        if any(not p for p in parts):
            raise ConfigError(f"Malformed config key '{key_prefix}{raw_key}'.", key=key_prefix + raw_key)
        if isinstance(value, Mapping):
            value = _expand_dotted(value, key_prefix + raw_key + ".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = deep_merge(node[last], value)
        else:
            node[last] = value
    return out


def deep_merge(base: Mapping, update: Mapping) -> Dict[str, Any]:
    """Recursively merges `update` into a copy of `base`; non-mapping values are replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _all_keys(cls, prefix: str = "") -> List[str]:
    """Every dotted key (sections and leaves) of a config class."""
    keys = []
    hints = _hints(cls)
    for name in _field_names(cls):
        key = prefix + name
        keys.append(key)
        if dataclasses.is_dataclass(hints[name]):
            keys.extend(_all_keys(hints[name], key + "."))
    return keys


def _nearest_key(root_cls, prefix: str, name: str, cls) -> str:
    """The valid key nearest to the unknown `prefix + name`: a sibling first, then anywhere."""
    siblings = _field_names(cls)
    close = difflib.get_close_matches(name, siblings, 1, 0.6)
    if close:
        return prefix + close[0]
    everything = _all_keys(root_cls)
    full = prefix + name
    # The right name in the wrong section, e.g. 'model.learning_rate' -> 'train.learning_rate'.
    same_leaf = [k for k in everything if k.rsplit(".", 1)[-1] == name]
    if not same_leaf:
        leaves = sorted({k.rsplit(".", 1)[-1] for k in everything})
        close_leaf = difflib.get_close_matches(name, leaves, 1, 0.75)
        if close_leaf:
            same_leaf = [k for k in everything if k.rsplit(".", 1)[-1] == close_leaf[0]]
    candidates = same_leaf or everything
    return max(candidates, key=lambda k: difflib.SequenceMatcher(None, full, k).ratio())


class _Dumper(yaml.SafeDumper):
    """Mappings in block style, lists in flow style: `sizes: [32.0, 64.0]`."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def _require(condition: bool, key: str, message: str):
    if not condition:
        raise ConfigError(f"Config key '{key}' {message}", key=key)


def _in_unit_interval(value: float) -> bool:
    return 0.0 <= value <= 1.0


class Config:
    """Behaviour shared by every config dataclass below.

    Construction checks types (``FPNConfig(num_channels="a")`` raises ConfigError); assignments
    made later are re-checked by :meth:`validate`.
    """

    def __post_init__(self):
        self._check_types("")

    # ---- conversion -----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A nested dict of plain Python values (YAML / JSON safe)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Block-style YAML (lists inline), readable by fpn_tf.configs.loader and plain yaml."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, width=100)

    @classmethod
    def from_dict(cls, values: Optional[Mapping] = None):
        """Defaults of `cls` overridden by `values` (which may be partial; dotted keys allowed)."""
        return cls()._apply(values or {}, "")

    def override(self, values: Optional[Mapping]):
        """A copy of this config with `values` (nested and/or dotted keys) applied."""
        return copy.deepcopy(self)._apply(values or {}, "")

    # ---- checking -------------------------------------------------------------------------
    def _apply(self, values: Mapping, prefix: str, root_cls=None):
        root_cls = root_cls or type(self)
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"Config section '{prefix.rstrip('.') or '<root>'}' expects a mapping, got "
                f"{values!r} (type {type(values).__name__}).",
                key=prefix.rstrip(".") or None,
            )
        hints = _hints(type(self))
        names = _field_names(type(self))
        for name, value in _expand_dotted(values, prefix).items():
            key = prefix + name
            if name not in names:
                nearest = _nearest_key(root_cls, prefix, name, type(self))
                section = prefix.rstrip(".") or "<root>"
                full_key, detail = key, ""
                if isinstance(value, Mapping) and value:
                    rest = _first_leaf(value)
                    full_key = f"{key}.{rest}"
                    detail = f" ('{name}' is not a key of '{section}')"
                    if f"{nearest}.{rest}" in _all_keys(root_cls):
                        nearest = f"{nearest}.{rest}"
                raise ConfigError(
                    f"Unknown config key '{full_key}'{detail}. Did you mean '{nearest}'? "
                    f"Valid keys under '{section}': {', '.join(names)}.",
                    key=full_key,
                )
            current = getattr(self, name)
            if isinstance(current, Config) and isinstance(value, Mapping):
                current._apply(value, key + ".", root_cls)
            else:
                object.__setattr__(self, name, _coerce(value, hints[name], key))
        return self

    def _check_types(self, prefix: str):
        hints = _hints(type(self))
        for name in _field_names(type(self)):
            object.__setattr__(self, name, _coerce(getattr(self, name), hints[name], prefix + name))

    def _check_values(self, prefix: str):
        """Per-section rules; overridden by sections that have any."""

    def _walk(self, prefix: str):
        """Sub-sections first, so that a section's own rules fire before rules that span sections."""
        for name in _field_names(type(self)):
            value = getattr(self, name)
            if isinstance(value, Config):
                yield from value._walk(prefix + name + ".")
        yield prefix, self

    def validate_section(self, prefix: str = ""):
        """Type and value checks of this section and its sub-sections (no cross-section rules)."""
        self._check_types(prefix)
        for sub_prefix, section in self._walk(prefix):
            section._check_values(sub_prefix)
        return self


# --------------------------------------------------------------------------------------------
# Model.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BackboneConfig(Config):
    """Bottom-up pathway. C2..C5 are the last blocks of conv2..conv5 (strides 4..32).

    weights: None (random init), "imagenet" (keras.applications; downloads unless cached) or a
      local .h5 / .weights.h5 path. The paper starts from ImageNet; the COCO YAMLs say "imagenet".
    freeze_at: 0 = train everything, 1 = freeze the stem, 2 = stem + conv2 (detectron2
      FREEZE_AT=2, the default), ... 5 = everything up to conv5.
    freeze_bn: BatchNorm in inference mode with frozen statistics and affine parameters.
    sync_batch_norm: when BatchNorm trains (freeze_bn false), compute its batch statistics over
      all replicas of the strategy (SyncBatchNorm), so the global batch, not each replica's
      slice, normalises.
    fold_frozen_bn: with freeze_bn, compute each conv + frozen BatchNorm as one convolution
      (same outputs up to float rounding, faster; `fpn_tf.modeling.frozen_batch_norm`). The
      checkpoint then holds the BatchNorm vectors under the conv's name.
    widths / blocks / stem_width: small_resnet only (ignored otherwise): channels and basic blocks
      of conv2..conv5, channels of the stem. The defaults are the builder's (a narrow ResNet-18
      shape); [64, 128, 256, 512] / [2, 2, 2, 2] / 64 is ResNet-18.
    """

    type: Literal["resnet50", "resnet101", "small_resnet"] = "resnet50"
    weights: Optional[str] = None
    freeze_at: int = 2
    freeze_bn: bool = True
    sync_batch_norm: bool = False
    fold_frozen_bn: bool = True
    widths: List[int] = _list(32, 64, 128, 256)
    blocks: List[int] = _list(1, 1, 1, 1)
    stem_width: int = 32

    def _check_values(self, p):
        _require(0 <= self.freeze_at <= 5, p + "freeze_at", f"must be in [0, 5], got {self.freeze_at}.")
        _require(len(self.widths) == 4, p + "widths", f"needs 4 entries (conv2..conv5), got {self.widths}.")
        _require(len(self.blocks) == 4, p + "blocks", f"needs 4 entries (conv2..conv5), got {self.blocks}.")
        _require(all(w > 0 for w in self.widths), p + "widths", f"must be positive, got {self.widths}.")
        _require(all(b > 0 for b in self.blocks), p + "blocks", f"must be positive, got {self.blocks}.")
        _require(self.stem_width > 0, p + "stem_width", f"must be positive, got {self.stem_width}.")
        if self.weights is not None:
            _require(self.weights.strip() != "", p + "weights", "must be null, 'imagenet' or a file path.")
            _require(
                self.type != "small_resnet",
                p + "weights",
                f"must be null for backbone type 'small_resnet' (it has no pretrained weights), "
                f"got {self.weights!r}.",
            )


@dataclasses.dataclass
class FPNConfig(Config):
    """Top-down pathway with lateral connections (paper §3).

    num_channels: d, the channels of every pyramid level (256 in the paper).
    min_level/max_level: pyramid levels P{min}..P{max} (2..6: P6 = stride-2 max-pool of P5).
    use_top_down / use_lateral: ablations of Table 1 (d) "bottom-up pyramid" (no top-down) and
      (e) "top-down pyramid without lateral connections".
    levels_used: subset of pyramid levels the heads use, e.g. ["P2"] for Table 1 (f); None = all.
    single_scale_level: "C4" or "C5" for the single-scale baselines of Table 1 (a)/(b): no pyramid,
      the RPN and RoI heads run on that backbone map; None = the pyramid.
    """

    num_channels: int = 256
    min_level: int = 2
    max_level: int = 6
    use_top_down: bool = True
    use_lateral: bool = True
    levels_used: Optional[List[str]] = None
    single_scale_level: Optional[Literal["C4", "C5"]] = None

    def _check_values(self, p):
        _require(self.num_channels > 0, p + "num_channels", f"must be positive, got {self.num_channels}.")
        _require(2 <= self.min_level <= 5, p + "min_level", f"must be in [2, 5], got {self.min_level}.")
        _require(
            self.min_level <= self.max_level,
            p + "min_level",
            f"({self.min_level}) must not exceed {p}max_level ({self.max_level}).",
        )
        _require(self.max_level <= 6, p + "max_level", f"must be at most 6 (P6), got {self.max_level}.")
        _require(
            self.use_top_down or self.use_lateral,
            p + "use_top_down",
            "and use_lateral cannot both be false (the pyramid would have no input).",
        )
        if self.levels_used is not None:
            valid = self.level_names()
            _require(len(self.levels_used) > 0, p + "levels_used", "must be null or a non-empty list.")
            for i, level in enumerate(self.levels_used):
                _require(level in valid, f"{p}levels_used[{i}]", f"must be one of {valid}, got {level!r}.")
            _require(
                len(set(self.levels_used)) == len(self.levels_used),
                p + "levels_used",
                f"has duplicates: {self.levels_used}.",
            )
            _require(
                self.single_scale_level is None,
                p + "levels_used",
                "and single_scale_level are exclusive ablations; set one of them.",
            )

    def level_names(self) -> List[str]:
        return [f"P{i}" for i in range(self.min_level, self.max_level + 1)]


@dataclasses.dataclass
class AnchorConfig(Config):
    """One anchor size per pyramid level (areas 32²..512² on P2..P6) × 3 aspect ratios (h/w)."""

    sizes: List[float] = _list(32.0, 64.0, 128.0, 256.0, 512.0)
    aspect_ratios: List[float] = _list(0.5, 1.0, 2.0)

    def _check_values(self, p):
        _require(len(self.sizes) > 0, p + "sizes", "must not be empty.")
        _require(all(s > 0 for s in self.sizes), p + "sizes", f"must be positive, got {self.sizes}.")
        _require(len(self.aspect_ratios) > 0, p + "aspect_ratios", "must not be empty.")
        _require(
            all(r > 0 for r in self.aspect_ratios),
            p + "aspect_ratios",
            f"must be positive, got {self.aspect_ratios}.",
        )


@dataclasses.dataclass
class RPNConfig(Config):
    """Region proposal network on the pyramid (paper §4.1), one head shared by all levels.

    positive_iou/negative_iou: anchor labelling (IoU > 0.7 positive, < 0.3 negative, rest ignored;
      the highest-IoU anchor of each ground truth is positive too).
    pre_nms_top_k_*: kept per level by objectness before NMS; post_nms_top_k_*: kept per image.
    min_box_size: proposals with a side smaller than this (input pixels) are dropped.
    smooth_l1_beta: transition point of the smooth-L1 box loss. 1/9 is Faster R-CNN's sigma=3
      (beta = 1/sigma²) as in Detectron; 0 makes it plain L1 (detectron2's current default).
    head_channels: the 3x3 conv's channels; None = the pyramid's num_channels.
    head_sparse_backward: compute the head's gradient only at the positions the RPN loss reaches
      (the sampled anchors); equal to the dense gradient up to float rounding, ~3x cheaper
      (fpn_tf/ops/rpn_head_ops.py). Off = TensorFlow's dense conv gradients.
    nms_impl: the proposals' NMS, same boxes either way: "per_image" (a map over images of the
      greedy NMS op; faster on CPUs, XLA-compatible) or "padded" (one batched padded NMS op).
    """

    head_channels: Optional[int] = None
    head_sparse_backward: bool = True
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_k_train: int = 2000
    post_nms_top_k_train: int = 2000
    pre_nms_top_k_test: int = 1000
    post_nms_top_k_test: int = 1000
    nms_iou: float = 0.7
    min_box_size: float = 0.0
    smooth_l1_beta: float = 1.0 / 9.0
    loss_weight: float = 1.0
    nms_impl: Literal["per_image", "padded"] = "per_image"

    def _check_values(self, p):
        if self.head_channels is not None:
            _require(self.head_channels > 0, p + "head_channels", f"must be positive, got {self.head_channels}.")
        for name in ("positive_iou", "negative_iou", "nms_iou"):
            value = getattr(self, name)
            _require(_in_unit_interval(value), p + name, f"must be in [0, 1], got {value}.")
        _require(
            self.negative_iou <= self.positive_iou,
            p + "negative_iou",
            f"({self.negative_iou}) must not exceed {p}positive_iou ({self.positive_iou}).",
        )
        _check_sampling(self, p)
        for name in ("pre_nms_top_k_train", "post_nms_top_k_train", "pre_nms_top_k_test", "post_nms_top_k_test"):
            value = getattr(self, name)
            _require(value > 0, p + name, f"must be positive, got {value}.")
        _require(self.min_box_size >= 0, p + "min_box_size", f"must be >= 0, got {self.min_box_size}.")
        _check_loss(self, p)


def _check_sampling(section, p):
    _require(
        section.batch_size_per_image > 0,
        p + "batch_size_per_image",
        f"must be positive, got {section.batch_size_per_image}.",
    )
    _require(
        0.0 < section.positive_fraction <= 1.0,
        p + "positive_fraction",
        f"must be in (0, 1], got {section.positive_fraction}.",
    )


def _check_loss(section, p):
    _require(section.smooth_l1_beta >= 0, p + "smooth_l1_beta", f"must be >= 0, got {section.smooth_l1_beta}.")
    _require(section.loss_weight >= 0, p + "loss_weight", f"must be >= 0, got {section.loss_weight}.")


def _check_box_weights(section, p):
    _require(len(section.box_weights) == 4, p + "box_weights", f"needs 4 values, got {section.box_weights}.")
    _require(
        all(w > 0 for w in section.box_weights),
        p + "box_weights",
        f"must be positive, got {section.box_weights}.",
    )


@dataclasses.dataclass
class RoIConfig(Config):
    """Fast R-CNN head on the pyramid (paper §4.2).

    An RoI of w×h input pixels goes to level k = floor(canonical_level + log2(sqrt(wh) /
    canonical_size)) clamped to [min_level, max_level] (Eq. 1), then RoIAlign output_size² with
    sampling_ratio samples per bin (0 = adaptive: ceil(RoI size in cells / output_size) per axis,
    at most 4; fpn_tf/ops/roi_ops.py), num_fc hidden fc layers of fc_dims + ReLU.
    Training samples batch_size_per_image RoIs per image (ground truth added to the proposals),
    positive_fraction of them foreground (IoU >= foreground_iou), the rest background (IoU below).
    box_weights: box-coder weights of the class-specific deltas.
    smooth_l1_beta: 1.0 is Fast R-CNN's smooth L1 (sigma = 1); 0 = L1 (detectron2's default).
    align_impl: how RoIAlign is computed, same samples either way: "gather" (one batched gather +
      matmul, static shapes), "crop_and_resize" (per-level native crops; faster forward on CPUs,
      dynamic shapes; its gradient is gather's) or "auto" (crop_and_resize at inference, gather
      in training and under XLA).
    """

    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    foreground_iou: float = 0.5
    canonical_size: float = 224.0
    canonical_level: int = 4
    min_level: int = 2
    max_level: int = 5
    output_size: int = 7
    sampling_ratio: int = 2
    num_fc: int = 2
    fc_dims: int = 1024
    box_weights: List[float] = _list(10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float = 1.0
    loss_weight: float = 1.0
    align_impl: Literal["auto", "gather", "crop_and_resize"] = "auto"

    def _check_values(self, p):
        _check_sampling(self, p)
        _require(
            _in_unit_interval(self.foreground_iou),
            p + "foreground_iou",
            f"must be in [0, 1], got {self.foreground_iou}.",
        )
        _require(self.canonical_size > 0, p + "canonical_size", f"must be positive, got {self.canonical_size}.")
        _require(
            self.min_level <= self.max_level,
            p + "min_level",
            f"({self.min_level}) must not exceed {p}max_level ({self.max_level}).",
        )
        _require(
            self.min_level <= self.canonical_level <= self.max_level,
            p + "canonical_level",
            f"must be in [{p}min_level, {p}max_level] = [{self.min_level}, {self.max_level}], "
            f"got {self.canonical_level}.",
        )
        _require(self.output_size > 0, p + "output_size", f"must be positive, got {self.output_size}.")
        _require(self.sampling_ratio >= 0, p + "sampling_ratio", f"must be >= 0, got {self.sampling_ratio}.")
        _require(self.num_fc >= 1, p + "num_fc", f"must be >= 1, got {self.num_fc}.")
        _require(self.fc_dims > 0, p + "fc_dims", f"must be positive, got {self.fc_dims}.")
        _check_loss(self, p)
        _check_box_weights(self, p)


@dataclasses.dataclass
class DetectionConfig(Config):
    """Inference post-processing: score threshold, per-class NMS, detections kept per image.

    nms_impl: the per-class NMS: "per_image" or "padded" (one class-agnostic NMS over
      class-shifted boxes; XLA-compatible) or "combined" (tf.image.combined_non_max_suppression;
      no XLA kernel); the same detections unless over 5000 candidates pass score_threshold.
    """

    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100
    nms_impl: Literal["per_image", "padded", "combined"] = "per_image"

    def _check_values(self, p):
        _require(
            _in_unit_interval(self.score_threshold),
            p + "score_threshold",
            f"must be in [0, 1], got {self.score_threshold}.",
        )
        _require(_in_unit_interval(self.nms_iou), p + "nms_iou", f"must be in [0, 1], got {self.nms_iou}.")
        _require(self.max_detections > 0, p + "max_detections", f"must be positive, got {self.max_detections}.")


@dataclasses.dataclass
class ModelConfig(Config):
    """FPN Faster R-CNN. num_classes: foreground classes; 0 = the dataset's number of categories."""

    num_classes: int = 0
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    fpn: FPNConfig = dataclasses.field(default_factory=FPNConfig)
    anchor: AnchorConfig = dataclasses.field(default_factory=AnchorConfig)
    rpn: RPNConfig = dataclasses.field(default_factory=RPNConfig)
    roi: RoIConfig = dataclasses.field(default_factory=RoIConfig)
    detection: DetectionConfig = dataclasses.field(default_factory=DetectionConfig)

    def _check_values(self, p):
        _require(
            self.num_classes >= 0,
            p + "num_classes",
            f"must be >= 0 (0 = from the dataset), got {self.num_classes}.",
        )
        fpn = self.fpn
        if fpn.single_scale_level is None:
            num_levels = fpn.max_level - fpn.min_level + 1
            _require(
                len(self.anchor.sizes) == num_levels,
                p + "anchor.sizes",
                f"needs one size per pyramid level P{fpn.min_level}..P{fpn.max_level} "
                f"({num_levels}), got {len(self.anchor.sizes)}: {self.anchor.sizes}.",
            )
            _require(
                fpn.min_level <= self.roi.min_level,
                p + "roi.min_level",
                f"({self.roi.min_level}) must be a pyramid level: >= {p}fpn.min_level ({fpn.min_level}).",
            )
            _require(
                self.roi.max_level <= fpn.max_level,
                p + "roi.max_level",
                f"({self.roi.max_level}) must be a pyramid level: <= {p}fpn.max_level ({fpn.max_level}).",
            )


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SyntheticDataConfig(Config):
    """A generated shapes set in COCO format (source: synthetic), for tests and the CPU demo.

    Arguments of fpn_tf.data.synthetic.generate_split, which writes
    <output_dir>/annotations/instances_<split>.json and images under <output_dir>/<split>/
    (split "train" for train_data, "val" for eval_data); the trainer generates it once, then
    reads it as a COCO source. output_dir: None = a folder chosen by the trainer.
    image_size: [min, max] pixels; each image's height and width are drawn from that range.
    max_objects: objects per image, at most.
    """

    num_images: int = 400
    image_size: List[int] = _list(320, 512)
    max_objects: int = 8
    seed: int = 0
    output_dir: Optional[str] = None

    def _check_values(self, p):
        _require(self.num_images > 0, p + "num_images", f"must be positive, got {self.num_images}.")
        _require(
            len(self.image_size) == 2 and 16 <= self.image_size[0] <= self.image_size[1],
            p + "image_size",
            f"must be [min, max] with 16 <= min <= max, got {self.image_size}.",
        )
        _require(self.max_objects > 0, p + "max_objects", f"must be positive, got {self.max_objects}.")


@dataclasses.dataclass
class DataConfig(Config):
    """One input pipeline (train_data or eval_data).

    Field names are those fpn_tf.data.build_dataset / as_source read.
    source: "coco" (annotation_file + image_dir), "tfrecord" (Model Garden tf.Example shards
      matching file_pattern; category_map: the id -> name JSON, None = the one beside the shards)
      or "synthetic" (generated, see SyntheticDataConfig, then read as COCO).
    annotation_file: for eval_data it is also the ground truth of the COCO metrics when set
      (official areas, crowd regions), whatever the source.
    short_side / max_long_side: resize so the shorter side is short_side and the longer side at
      most max_long_side (800 / 1333). pad_multiple: padded sizes are multiples of it.
    padding_mode: "orientation" (two static shapes: landscape / portrait), "square" (one) or
      "batch" (each batch to its largest image); see fpn_tf.data.pipeline.
    global_batch_size: over all replicas; must be divisible by the number of replicas.
    shuffle_buffer_size: None = the pipeline's default (every image for COCO sources).
    max_num_instances: ground-truth rows per image (padded; extra objects dropped).
    on_bad_data: "skip" a corrupt/unreadable example (logged) or "error".
    verify_images: how much of each COCO image file is checked when indexing.
    """

    is_training: bool = True
    source: Literal["coco", "tfrecord", "synthetic"] = "coco"
    annotation_file: Optional[str] = None
    image_dir: Optional[str] = None
    file_pattern: Optional[str] = None
    category_map: Optional[str] = None
    short_side: int = 800
    max_long_side: int = 1333
    pad_multiple: int = 32
    padding_mode: Literal["orientation", "square", "batch"] = "orientation"
    random_flip: bool = True
    global_batch_size: int = 16
    shuffle_buffer_size: Optional[int] = None
    max_num_instances: int = 100
    on_bad_data: Literal["skip", "error"] = "skip"
    verify_images: Literal["header", "full", "none"] = "header"
    synthetic: SyntheticDataConfig = dataclasses.field(default_factory=SyntheticDataConfig)

    def _check_values(self, p):
        if self.source == "coco":
            _require(bool(self.annotation_file), p + "annotation_file", "is required when source is 'coco'.")
            _require(bool(self.image_dir), p + "image_dir", "is required when source is 'coco'.")
        elif self.source == "tfrecord":
            _require(bool(self.file_pattern), p + "file_pattern", "is required when source is 'tfrecord'.")
        _require(self.short_side > 0, p + "short_side", f"must be positive, got {self.short_side}.")
        _require(
            self.max_long_side >= self.short_side,
            p + "max_long_side",
            f"({self.max_long_side}) must be >= {p}short_side ({self.short_side}).",
        )
        _require(self.pad_multiple >= 1, p + "pad_multiple", f"must be >= 1, got {self.pad_multiple}.")
        _require(
            self.global_batch_size > 0,
            p + "global_batch_size",
            f"must be positive, got {self.global_batch_size}.",
        )
        if self.shuffle_buffer_size is not None:
            _require(
                self.shuffle_buffer_size >= 0,
                p + "shuffle_buffer_size",
                f"must be >= 0 or null, got {self.shuffle_buffer_size}.",
            )
        _require(
            self.max_num_instances > 0,
            p + "max_num_instances",
            f"must be positive, got {self.max_num_instances}.",
        )

    def per_replica_batch_size(self, num_replicas: int) -> int:
        if num_replicas <= 0 or self.global_batch_size % num_replicas:
            raise ConfigError(
                f"Config key 'global_batch_size' ({self.global_batch_size}) is not divisible by the "
                f"number of replicas ({num_replicas}).",
                key="global_batch_size",
            )
        return self.global_batch_size // num_replicas

    def _file_paths(self) -> Dict[str, Optional[str]]:
        if self.source == "coco":
            return {"annotation_file": self.annotation_file, "image_dir": self.image_dir}
        if self.source == "tfrecord":
            return {
                "file_pattern": self.file_pattern,
                "category_map": self.category_map,
                "annotation_file": self.annotation_file,
            }
        return {}


def _train_data() -> DataConfig:
    return DataConfig(
        is_training=True,
        annotation_file="data/coco/annotations/instances_train2017.json",
        image_dir="data/coco/train2017",
        random_flip=True,
        global_batch_size=16,
    )


def _eval_data() -> DataConfig:
    return DataConfig(
        is_training=False,
        annotation_file="data/coco/annotations/instances_val2017.json",
        image_dir="data/coco/val2017",
        random_flip=False,
        global_batch_size=8,
    )


# --------------------------------------------------------------------------------------------
# Training, evaluation, runtime.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig(Config):
    """Optimisation and the training loop (detectron2 "1x": 90k steps at batch 16).

    learning_rate: base LR for reference_batch_size images; with scale_lr_with_batch the LR used is
      learning_rate * global_batch_size / reference_batch_size (linear scaling rule; the step
      counts are not rescaled). See :meth:`scaled_learning_rate` and lr_schedule.WarmupStepDecay.
    optimizer: "sgd" (with momentum) or "adamw" (momentum is then unused).
    weight_decay: for sgd, the L2 coefficient as in the paper/Caffe/detectron2, i.e. weight_decay *
      w added to the gradient before momentum (Keras' own SGD(weight_decay=...) is decoupled and
      ~1/(1-momentum) = 10x weaker); for adamw, AdamW's decoupled decay.
    weight_decay_excludes_bn_and_bias: no decay on BatchNorm parameters and biases.
    warmup_steps / warmup_factor: LR ramps linearly from warmup_factor * LR to LR.
    decay_steps / decay_factor: LR multiplied by decay_factor at each listed step.
    gradient_clip_norm: clip by global norm; None = no clipping.
    on_nan: a non-finite loss either stops the run ("stop") or skips that update ("skip").
    """

    total_steps: int = 90000
    optimizer: Literal["sgd", "adamw"] = "sgd"
    learning_rate: float = 0.02
    scale_lr_with_batch: bool = True
    reference_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_excludes_bn_and_bias: bool = True
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    decay_steps: List[int] = _list(60000, 80000)
    decay_factor: float = 0.1
    gradient_clip_norm: Optional[float] = None
    checkpoint_every_steps: int = 5000
    max_checkpoints_to_keep: int = 5
    log_every_steps: int = 20
    summary_every_steps: int = 100
    on_nan: Literal["stop", "skip"] = "stop"
    seed: int = 0

    def _check_values(self, p):
        _require(self.total_steps > 0, p + "total_steps", f"must be positive, got {self.total_steps}.")
        _require(self.learning_rate > 0, p + "learning_rate", f"must be positive, got {self.learning_rate}.")
        _require(
            self.reference_batch_size > 0,
            p + "reference_batch_size",
            f"must be positive, got {self.reference_batch_size}.",
        )
        _require(0.0 <= self.momentum < 1.0, p + "momentum", f"must be in [0, 1), got {self.momentum}.")
        _require(self.weight_decay >= 0, p + "weight_decay", f"must be >= 0, got {self.weight_decay}.")
        _require(self.warmup_steps >= 0, p + "warmup_steps", f"must be >= 0, got {self.warmup_steps}.")
        _require(
            0.0 <= self.warmup_factor <= 1.0,
            p + "warmup_factor",
            f"must be in [0, 1], got {self.warmup_factor}.",
        )
        _require(all(s > 0 for s in self.decay_steps), p + "decay_steps", f"must be positive, got {self.decay_steps}.")
        _require(
            all(a < b for a, b in zip(self.decay_steps, self.decay_steps[1:])),
            p + "decay_steps",
            f"must be strictly increasing, got {self.decay_steps}.",
        )
        _require(0.0 < self.decay_factor <= 1.0, p + "decay_factor", f"must be in (0, 1], got {self.decay_factor}.")
        if self.gradient_clip_norm is not None:
            _require(
                self.gradient_clip_norm > 0,
                p + "gradient_clip_norm",
                f"must be positive or null, got {self.gradient_clip_norm}.",
            )
        for name in ("checkpoint_every_steps", "max_checkpoints_to_keep", "log_every_steps", "summary_every_steps"):
            value = getattr(self, name)
            _require(value > 0, p + name, f"must be positive, got {value}.")

    def scaled_learning_rate(self, global_batch_size: int) -> float:
        """The LR actually used: linear scaling rule when scale_lr_with_batch, else learning_rate."""
        if not self.scale_lr_with_batch:
            return self.learning_rate
        return self.learning_rate * global_batch_size / self.reference_batch_size


@dataclasses.dataclass
class EvalConfig(Config):
    """Evaluation. steps: batches per evaluation (None = the whole eval set).

    every_steps: evaluate every so many training steps in train_and_eval mode.
    compute_rpn_recall: also report proposal AR@100/AR@1000 (paper Table 1).
    per_category_metrics: add AP per category to the metrics.
    """

    steps: Optional[int] = None
    every_steps: int = 10000
    compute_rpn_recall: bool = True
    per_category_metrics: bool = False

    def _check_values(self, p):
        if self.steps is not None:
            _require(self.steps > 0, p + "steps", f"must be positive or null, got {self.steps}.")
        _require(self.every_steps > 0, p + "every_steps", f"must be positive, got {self.every_steps}.")


@dataclasses.dataclass
class RuntimeConfig(Config):
    """Where and how the computation runs.

    strategy: "one_device" (devices[0], or the first GPU, else the CPU), "mirrored" (devices, or
      all local GPUs) or "multi_worker_mirrored" (cluster from TF_CONFIG).
    devices: e.g. ["/gpu:0", "/gpu:1"]; None = automatic.
    num_logical_cpu_devices: split the CPU into that many logical devices before the strategy is
      made (tests of multi-replica code without GPUs); 0 = leave as is.
    mixed_precision: None/"float32" (off), "mixed_float16" or "mixed_bfloat16" (Keras dtype
      policies); "float16" and "bfloat16" are Model Garden spellings of the two mixed policies.
    jit_compile: XLA-compile the train/eval steps.
    """

    strategy: Literal["one_device", "mirrored", "multi_worker_mirrored"] = "one_device"
    devices: Optional[List[str]] = None
    num_logical_cpu_devices: int = 0
    mixed_precision: Optional[
        Literal["float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16"]
    ] = None
    jit_compile: bool = False

    def _check_values(self, p):
        _require(
            self.num_logical_cpu_devices >= 0,
            p + "num_logical_cpu_devices",
            f"must be >= 0, got {self.num_logical_cpu_devices}.",
        )
        if self.devices is not None:
            _require(len(self.devices) > 0, p + "devices", "must be null or a non-empty list.")
            if self.strategy == "one_device":
                _require(
                    len(self.devices) == 1,
                    p + "devices",
                    f"lists {len(self.devices)} devices but strategy is 'one_device'.",
                )

    def dtype_policy(self) -> Optional[str]:
        """The Keras dtype policy name to set, or None for the float32 default."""
        return {
            None: None,
            "float32": None,
            "float16": "mixed_float16",
            "mixed_float16": "mixed_float16",
            "bfloat16": "mixed_bfloat16",
            "mixed_bfloat16": "mixed_bfloat16",
        }[self.mixed_precision]


# --------------------------------------------------------------------------------------------
# The experiment.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExperimentConfig(Config):
    """Everything a run needs. Defaults: FPN Faster R-CNN R-50, COCO train2017/val2017, 1x."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train_data: DataConfig = dataclasses.field(default_factory=_train_data)
    eval_data: DataConfig = dataclasses.field(default_factory=_eval_data)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def validate(self, num_replicas: Optional[int] = None, check_files: bool = False) -> "ExperimentConfig":
        """Raises ConfigError on impossible values; returns self.

        num_replicas: replicas in sync (strategy.num_replicas_in_sync); both global batch sizes
          must divide by it. None = taken from runtime.devices when listed (1 for one_device), else
          not checked.
        check_files: also require the data/weights paths that the sources need to exist.
        """
        self.validate_section("")
        if num_replicas is None:
            if self.runtime.strategy == "one_device":
                num_replicas = 1
            elif self.runtime.devices and self.runtime.strategy == "mirrored":
                num_replicas = len(self.runtime.devices)
        if num_replicas is not None:
            if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas <= 0:
                raise ConfigError(f"num_replicas must be a positive int, got {num_replicas!r}.")
            for name in ("train_data", "eval_data"):
                batch = getattr(self, name).global_batch_size
                _require(
                    batch % num_replicas == 0,
                    f"{name}.global_batch_size",
                    f"({batch}) must be divisible by the number of replicas ({num_replicas}).",
                )
        if check_files:
            paths = {f"train_data.{k}": v for k, v in self.train_data._file_paths().items()}
            paths.update({f"eval_data.{k}": v for k, v in self.eval_data._file_paths().items()})
            weights = self.model.backbone.weights
            if weights is not None and weights != "imagenet":
                paths["model.backbone.weights"] = weights
            for key, path in paths.items():
                if path and "://" not in path:
                    exists = bool(glob.glob(path)) if key.endswith("file_pattern") else os.path.exists(path)
                    _require(exists, key, f"points to {path!r}, which does not exist.")
        return self
