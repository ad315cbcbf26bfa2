"""A model directory: the one place that writes, reads and restores one.

It holds ``params.yaml`` (the resolved config that rebuilds the model), ``category_map.json``
(the categories in class order) and ``tf.train.Checkpoint(model=..., optimizer=...)`` files, or
``model=`` alone for a converted model (``ckpt-0``). `restore_model` restores every weight or
names the missing part. `weight_switches`: the config fields that change what the same weights
compute; the converter and ``model.init_checkpoint`` refuse a config that differs in one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from absl import logging
import keras
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from fpn_tf.configs.base import ConfigError
from fpn_tf.configs.loader import PARAMS_FILENAME, load_config, save_config
from fpn_tf.data.category_map import CategoryMap, as_category_map
from fpn_tf.errors import UserError
from fpn_tf.modeling.backbones import pixel_normalization
from fpn_tf.modeling.factory import build_model

__all__ = [
    "CATEGORY_MAP_FILENAME",
    "LoadedModel",
    "ModelDirError",
    "PARAMS_FILENAME",
    "check_same_weight_switches",
    "latest_checkpoint",
    "load_model",
    "read_category_map",
    "read_config",
    "restore_model",
    "save_model_checkpoint",
    "weight_switches",
    "write_model_dir",
]

CATEGORY_MAP_FILENAME = "category_map.json"

# Each backbone type's BatchNorm epsilon when model.backbone.bn_epsilon is null (the builders').
_DEFAULT_BN_EPSILON = {"resnet50": 1.001e-5, "resnet101": 1.001e-5, "small_resnet": 1e-5}


class ModelDirError(UserError, ValueError):
    """A model directory that cannot be read or does not fit the model; one line naming it."""


# --- writing -------------------------------------------------------------------------------------
def write_model_dir(model_dir: str, config, category_map: CategoryMap) -> None:
    """Writes ``params.yaml`` and ``category_map.json`` into ``model_dir`` (created)."""
    os.makedirs(model_dir, exist_ok=True)
    save_config(config, model_dir)
    category_map.to_json(os.path.join(model_dir, CATEGORY_MAP_FILENAME))


def save_model_checkpoint(model, model_dir: str, number: int = 0) -> str:
    """Writes the model's weights alone as ``<model_dir>/ckpt-<number>``; returns its path."""
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), model_dir, 1)
    return manager.save(checkpoint_number=number)


# --- reading -------------------------------------------------------------------------------------
def read_config(
    model_dir: str, config_file: str | Sequence[str] | None = None, params_override: Any = None
):
    """The config of a model directory: its ``params.yaml`` (or ``config_file``, a path or
    several applied in order), with ``params_override`` on top."""
    if not config_file:
        config_file = os.path.join(model_dir, PARAMS_FILENAME)
        if not tf.io.gfile.exists(config_file):
            raise ModelDirError(
                f"{config_file} not found (a model directory holds the config of its model; "
                "--config_file names another)"
            )
    return load_config(config_file, params_override)


def read_category_map(model_dir: str) -> CategoryMap:
    path = os.path.join(model_dir, CATEGORY_MAP_FILENAME)
    if not tf.io.gfile.exists(path):
        raise ModelDirError(
            f"{path} not found: the trainer and the converter write it beside the checkpoints"
        )
    return CategoryMap.from_json(path)


def latest_checkpoint(model_dir: str) -> str:
    path = tf.train.latest_checkpoint(model_dir)
    if path is None:
        raise ModelDirError(f"{model_dir}: no checkpoint found (no 'checkpoint' index file)")
    return path


def model_parts(model) -> dict[str, keras.layers.Layer]:
    """The model's sub-layers by attribute name, their name in a checkpoint."""
    return {
        name: value
        for name, value in vars(model).items()
        if isinstance(value, keras.layers.Layer) and not name.startswith("_")
    }


def _stored_parts(checkpoint: str) -> tuple[set[str], bool]:
    """(the model's sub-layers that hold values in ``checkpoint``, whether it holds optimizer
    state), from its object graph: a variable's key follows its shortest path, often through the
    optimizer, so keys do not say which layer a weight belongs to."""
    reader = tf.train.load_checkpoint(checkpoint)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))

    def holds_values(node_id: int) -> bool:
        seen, stack = set(), [node_id]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if graph.nodes[node].attributes:
                return True
            stack.extend(c.node_id for c in graph.nodes[node].children)
        return False

    root = {c.local_name: c.node_id for c in graph.nodes[0].children}
    has_optimizer = "optimizer" in root and holds_values(root["optimizer"])
    if "model" not in root:
        return set(), has_optimizer
    parts = {
        child.local_name
        for child in graph.nodes[root["model"]].children
        if holds_values(child.node_id)
    }
    return parts, has_optimizer


def restore_model(model, checkpoint: str) -> bool:
    """Restores every weight of ``model`` (and its optimizer when both have one) from
    ``checkpoint``; returns whether the file holds optimizer state. Raises `ModelDirError` when
    a part is missing on either side or a weight does not fit."""
    try:
        stored_parts, has_optimizer = _stored_parts(checkpoint)
    except Exception as e:  # noqa: BLE001 - a missing or damaged file, said in one line
        raise ModelDirError(f"{checkpoint}: cannot be read ({_first_line(e)})") from e
    parts = model_parts(model)
    missing = [name for name, layer in parts.items() if layer.weights and name not in stored_parts]
    if missing:
        raise ModelDirError(
            f"{checkpoint}: holds no weights for this model's {', '.join(missing)} (a checkpoint "
            "of another architecture? model.architecture in params.yaml says which)"
        )
    extra = sorted(stored_parts - set(parts) - {"optimizer", "_compiled_trainable_state"})
    if extra:
        raise ModelDirError(
            f"{checkpoint}: holds weights for {', '.join(extra)}, which this model has not "
            "(a checkpoint of another architecture?)"
        )
    optimizer = getattr(model, "optimizer", None)
    if has_optimizer and optimizer is not None:
        root = tf.train.Checkpoint(model=model, optimizer=optimizer)
    else:  # bind the model's own parts: a compiled model tracks an optimizer the file lacks
        root = tf.train.Checkpoint(model=tf.train.Checkpoint(**parts))
    try:
        root.restore(checkpoint).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise ModelDirError(
            f"{checkpoint}: does not hold every weight of this model (another config or "
            f"category map than the one it was saved with?): {_first_line(e)}"
        ) from e
    return has_optimizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


@dataclasses.dataclass
class LoadedModel:
    """A model rebuilt from its directory with every weight restored."""

    model: Any
    category_map: CategoryMap
    config: Any  # the resolved ExperimentConfig
    checkpoint: str  # the checkpoint restored
    model_dir: str

    @property
    def category_names(self) -> list[str]:
        """The names of classes 1..C."""
        return list(self.category_map.names)


def load_model(
    model_dir: str | os.PathLike,
    *,
    config_file: str | Sequence[str] | None = None,
    params_override: Any = None,
    checkpoint: str | None = None,
    category_map: CategoryMap | str | os.PathLike | None = None,
) -> LoadedModel:
    """The model of a model directory, every weight restored from its latest checkpoint (or
    ``checkpoint``); ``config_file``, ``params_override`` (e.g.
    ``"model.detection.score_threshold=0.3"``) and ``category_map`` replace the directory's."""
    model_dir = os.fspath(model_dir)
    if not tf.io.gfile.isdir(model_dir):
        raise ModelDirError(f"{model_dir}: model directory not found")
    config = read_config(model_dir, config_file, params_override)
    # The checkpoint holds every weight: never fetch ImageNet weights to overwrite them.
    config.model.backbone.weights = None
    category_map = (
        read_category_map(model_dir) if category_map is None else as_category_map(category_map)
    )
    if checkpoint is None:
        checkpoint = latest_checkpoint(model_dir)
    elif not tf.io.gfile.exists(checkpoint + ".index"):
        raise ModelDirError(f"{checkpoint}: no such checkpoint ({checkpoint}.index not found)")
    try:
        model = build_model(config.model, category_ids=list(category_map.dataset_ids))
    except ValueError as e:  # an inconsistent model config, named by the builder
        raise ConfigError(f"model: {e}") from e
    restore_model(model, checkpoint)
    logging.info(
        "Restored %s (%s, %d classes)",
        checkpoint,
        config.model.architecture,
        category_map.num_classes,
    )
    return LoadedModel(model, category_map, config, checkpoint, model_dir)


# --- the switches that change what the weights compute ------------------------------------------
BACKBONE_SWITCHES = (
    "model.backbone.type",
    "model.backbone.stride_in_1x1",
    "model.backbone.bn_epsilon",
    "model.backbone.channel_order",
    "model.backbone.pixel_mean",
    "model.backbone.pixel_std",
    "model.backbone.pad_normalized_zero",
)
HEAD_SWITCHES = (
    "model.anchor.sizes",
    "model.anchor.aspect_ratios",
    "model.anchor.offset",
    "model.anchor.round_cell_anchors",
    "model.anchor.stride_from_padded_size",
    "model.roi_aligner.aligned",
    "model.mask_roi_aligner.aligned",
    "model.box_head.box_weights",
)


def weight_switches(model_cfg, fields: Sequence[str] = BACKBONE_SWITCHES + HEAD_SWITCHES) -> dict:
    """``{field: value}`` of the switches, null backbone settings resolved to the type's."""
    backbone = model_cfg.backbone
    order, mean, std = pixel_normalization(
        backbone.type, backbone.channel_order, backbone.pixel_mean, backbone.pixel_std
    )
    resolved = {
        "model.backbone.bn_epsilon": (
            _DEFAULT_BN_EPSILON[backbone.type]
            if backbone.bn_epsilon is None
            else float(backbone.bn_epsilon)
        ),
        "model.backbone.channel_order": order,
        "model.backbone.pixel_mean": [round(float(m), 6) for m in mean],
        "model.backbone.pixel_std": [round(float(s), 6) for s in std],
        # small_resnet has no stride_in_1x1 switch (it is ignored there).
        "model.backbone.stride_in_1x1": (
            None if backbone.type == "small_resnet" else bool(backbone.stride_in_1x1)
        ),
    }
    out = {}
    for name in fields:
        if name in resolved:
            out[name] = resolved[name]
            continue
        value = model_cfg
        for part in name.split(".")[1:]:
            value = getattr(value, part)
        out[name] = [float(v) for v in value] if isinstance(value, (list, tuple)) else value
    return out


def check_same_weight_switches(
    config_model, source_model, *, what: str, source: str, fields: Sequence[str] | None = None
) -> None:
    """Raises ConfigError (key ``what``) when ``config_model`` differs from ``source_model`` (the
    weights' own, read from ``source``) in a weight switch."""
    fields = tuple(fields or (BACKBONE_SWITCHES + HEAD_SWITCHES))
    ours, theirs = weight_switches(config_model, fields), weight_switches(source_model, fields)
    for name in fields:
        if ours[name] != theirs[name]:
            raise ConfigError(
                f"{name} is {ours[name]!r} but the weights were made with {theirs[name]!r} "
                f"({source}): they would load and compute something else; use the source's "
                "value",
                key=what,
            )
