"""Starting a detector from another model's weights (fine-tuning): ``model.init_checkpoint``.

The source model directory is rebuilt (`model_dir.load_model`) and its weights are copied part
by part (`PARTS`), each weight paired with the one of the same layer and name. ``modules="all"``
copies every part, the class-specific ones only when the source has the same category ids
(else they keep their fresh initialisation); ``modules="backbone"`` only the backbone. A copied
part must have the source's layers and shapes, checked before any weight is written, and the
source's weight switches (`model_dir.weight_switches`) must equal the config's: a converted
torchvision model fine-tuned with the default ResNet switches would load and compute something
else. A folded conv + frozen BatchNorm pairs with the unfolded layers (same parameters).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
import keras
import tensorflow as tf

from fpn_tf.configs.base import ConfigError
from fpn_tf.modeling import model_dir

__all__ = [
    "DETECTOR_PARTS",
    "MODULES",
    "MASK_PARTS",
    "PARTS",
    "InitCheckpointError",
    "InitCheckpointReport",
    "load_init_checkpoint",
    "model_parts",
]

MODULES = ("all", "backbone")
DETECTOR_PARTS = (
    "backbone",
    "pyramid",
    "rpn",
    "box head fc layers",
    "class layers",
    "mask head",
    "mask predictor",
)
PARTS = DETECTOR_PARTS + ("segment head",)
_CLASS_PART = "class layers"
# Parts only a Mask R-CNN has; the predictor is class-specific like the class layers.
MASK_PARTS = ("mask head", "mask predictor")
# The config keys that decide each part's architecture, named in the mismatch errors.
_PART_CONFIG = {
    "backbone": "model.backbone",
    "pyramid": "model.fpn",
    "rpn": "model.rpn / model.anchor",
    "box head fc layers": "model.box_head.num_fc / fc_dims, model.roi_aligner.output_size",
    "segment head": "model.segment_proposals",
}
_BN_VECTORS = ("gamma", "beta", "moving_mean", "moving_variance")


class InitCheckpointError(ConfigError):
    """An init checkpoint that cannot initialise the model; one line, naming the path."""

    def __init__(self, message: str):
        super().__init__(message, key="model.init_checkpoint")


@dataclasses.dataclass
class InitCheckpointReport:
    """What `load_init_checkpoint` did."""

    source: str  # the checkpoint restored, or a description of an in-memory source model
    modules: str
    loaded: dict[str, int]  # part -> weights copied
    reinitialised: dict[str, str]  # part -> why it keeps its fresh initialisation
    source_category_ids: list[int]

    def lines(self) -> list[str]:
        out = []
        for part in PARTS:
            if part in self.loaded:
                out.append(
                    f"Init checkpoint: {part}: loaded {self.loaded[part]} weights from "
                    f"{self.source}"
                )
            elif part in self.reinitialised:
                out.append(
                    f"Init checkpoint: {part}: re-initialised (not taken from {self.source}): "
                    f"{self.reinitialised[part]}"
                )
        return out


def model_parts(model) -> dict[str, list]:
    """The weights of a detector or a segment-proposal model by part (`PARTS`), each weight in
    exactly one part (a detector's mask parts are empty without a mask branch)."""
    fpn = model.fpn
    backbones = [layer for layer in fpn.layers if isinstance(layer, keras.Model)]
    if len(backbones) != 1:
        raise InitCheckpointError(
            f"{fpn.name}: expected one backbone model inside the pyramid model, found "
            f"{[b.name for b in backbones]}"
        )
    backbone_ids = {id(v) for v in backbones[0].weights}
    parts = {
        "backbone": list(backbones[0].weights),
        "pyramid": [v for v in fpn.weights if id(v) not in backbone_ids],
    }
    if getattr(model, "roi_heads", None) is None:  # the segment-proposal model
        parts["segment head"] = list(model.head.weights)
        return _checked(model, parts)
    box_head = model.roi_heads.box_head
    parts.update(
        {
            "rpn": list(model.rpn.weights),
            "box head fc layers": [w for fc in box_head.fcs for w in fc.weights],
            _CLASS_PART: list(box_head.classifier.weights) + list(box_head.box_regressor.weights),
            "mask head": [],
            "mask predictor": [],
        }
    )
    head = model.roi_heads.mask_head
    if head is not None:
        parts["mask head"] = [w for layer in head.convs + [head.deconv] for w in layer.weights]
        parts["mask predictor"] = list(head.predictor.weights)
    return _checked(model, parts)


def _checked(model, parts: dict[str, list]) -> dict[str, list]:
    covered = {id(v) for weights in parts.values() for v in weights}
    stray = [v.path for v in model.weights if id(v) not in covered]
    if stray:  # a layer this module does not know: never leave it silently uninitialised
        raise InitCheckpointError(
            f"{len(stray)} weights of {model.name} belong to no known part (first: "
            f"'{stray[0]}'); fpn_tf.training.init_checkpoint.model_parts needs updating"
        )
    return parts


def _key(path: str) -> str:
    """The name a weight is paired by: its path, a folded conv's BatchNorm vectors
    (``conv1_conv/gamma``) named as the unfolded BatchNorm's (``conv1_bn/gamma``)."""
    layer, _, name = path.rpartition("/")
    if name in _BN_VECTORS and layer.endswith("_conv"):
        return f"{layer[: -len('_conv')]}_bn/{name}"
    return path


def _by_key(weights) -> dict[str, list]:
    out: dict[str, list] = {}
    for v in weights:
        out.setdefault(_key(v.path), []).append(v)
    return out


def _shape(v) -> tuple:
    return tuple(int(d) for d in v.shape)


def _pair(part: str, source_weights, target_weights, where: str):
    """[(source, target)] for one part, or an InitCheckpointError for the first difference."""
    src, dst = _by_key(source_weights), _by_key(target_weights)
    hint = (
        f"the architectures differ ({_PART_CONFIG[part]} must be the source's, as in its "
        "params.yaml)"
        if part in _PART_CONFIG
        else "the architectures differ"
    )
    only_here = [k for k in dst if len(src.get(k, ())) != len(dst[k])]
    only_there = [k for k in src if len(dst.get(k, ())) != len(src[k])]
    if only_here or only_there:
        detail = []
        if only_here:
            detail.append(
                f"this model has {len(only_here)} weights the source has not (first: "
                f"'{only_here[0]}')"
            )
        if only_there:
            detail.append(
                f"the source has {len(only_there)} weights this model has not (first: "
                f"'{only_there[0]}')"
            )
        raise InitCheckpointError(f"{where}: {part}: {' and '.join(detail)}: {hint}")
    pairs = []
    for key, targets in dst.items():
        for s, d in zip(src[key], targets):
            if _shape(s) != _shape(d):
                raise InitCheckpointError(
                    f"{where}: {part} weight '{key}' has shape {_shape(s)} in the source and "
                    f"{_shape(d)} in this model: {hint}"
                )
            pairs.append((s, d))
    return pairs


def _ids(ids) -> str:
    ids = [int(i) for i in ids]
    if len(ids) <= 8:
        return ", ".join(map(str, ids))
    return f"{', '.join(map(str, ids[:3]))}, ..., {ids[-1]}"


def _load_source(path: str):
    """The `LoadedModel` of a model directory or of a checkpoint prefix inside one."""
    from fpn_tf.data.errors import DataError  # pylint: disable=g-import-not-at-top

    if tf.io.gfile.isdir(path):
        directory, checkpoint = path, None
    else:
        directory, checkpoint = os.path.dirname(path) or ".", path
    try:
        return model_dir.load_model(directory, checkpoint=checkpoint)
    except (model_dir.ModelDirError, ConfigError, DataError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitCheckpointError(f"model.init_checkpoint {path!r}: {first}") from e


def load_init_checkpoint(
    model, source: Any, modules: str = "all", config=None
) -> InitCheckpointReport:
    """Copies the weights of ``source`` (a model directory, a checkpoint prefix inside one, or a
    model in memory) into ``model``; all or nothing. ``config``: ``model``'s section, whose weight
    switches must be the source directory's."""
    if modules not in MODULES:
        raise InitCheckpointError(
            f"model.init_checkpoint_modules must be one of {MODULES}, got {modules!r}"
        )
    if isinstance(source, (str, os.PathLike)):
        loaded = _load_source(os.fspath(source))
        source_model, checkpoint = loaded.model, loaded.checkpoint
        where = f"model.init_checkpoint {checkpoint}"
        description = checkpoint
        if config is not None:
            detectors = hasattr(model, "roi_heads") and hasattr(source_model, "roi_heads")
            fields = model_dir.BACKBONE_SWITCHES
            if modules == "all" and detectors:
                fields += model_dir.HEAD_SWITCHES
            try:
                model_dir.check_same_weight_switches(
                    config, loaded.config.model, what="model.init_checkpoint",
                    source=f"{loaded.model_dir}/params.yaml", fields=fields,
                )  # fmt: skip
            except ConfigError as e:
                raise InitCheckpointError(f"model.init_checkpoint: {e}") from e
    else:
        source_model = source
        description = f"the model {source.name!r}"
        where = f"model.init_checkpoint {description}"
    source_parts, target_parts = model_parts(source_model), model_parts(model)
    source_ids = [int(i) for i in getattr(source_model, "category_ids", None) or []]
    target_ids = [int(i) for i in getattr(model, "category_ids", None) or []]

    taken = ("backbone",) if modules == "backbone" else PARTS
    pairs_by_part, reinitialised = {}, {}
    for part in PARTS:
        if not target_parts.get(part):
            continue  # a part this model does not have (a mask branch, a segment head)
        if part not in taken:
            reinitialised[part] = "init_checkpoint_modules is 'backbone'"
            continue
        if part in MASK_PARTS and not source_parts.get(part):
            reinitialised[part] = "the source has no mask branch"
            continue
        if part not in source_parts:
            reinitialised[part] = f"the source ({source_model.name}) has no {part}"
            continue
        if part in (_CLASS_PART, "mask predictor"):
            if source_ids != target_ids:
                reinitialised[part] = (
                    f"the source has other classes ({len(source_ids)}, category ids "
                    f"{_ids(source_ids)}) than this model ({len(target_ids)}, category ids "
                    f"{_ids(target_ids)})"
                )
                continue
            try:
                pairs_by_part[part] = _pair(part, source_parts[part], target_parts[part], where)
            except InitCheckpointError as e:
                reinitialised[part] = f"same classes, but other layers or shapes: {e}"
            continue
        pairs_by_part[part] = _pair(part, source_parts[part], target_parts[part], where)

    # Every pair checked: now write (all or nothing).
    for pairs in pairs_by_part.values():
        for s, d in pairs:
            d.assign(s.numpy())
    loaded_counts = {part: len(pairs) for part, pairs in pairs_by_part.items()}
    report = InitCheckpointReport(description, modules, loaded_counts, reinitialised, source_ids)
    for line in report.lines():
        logging.info(line)
    return report
