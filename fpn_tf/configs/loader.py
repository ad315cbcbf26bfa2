"""Resolving an experiment: defaults -> YAML file(s) -> params_override; saving it with a run.

A YAML file may start from others with ``_base_: other.yaml`` (relative to the file, or a list,
merged in order, its own keys last), as detectron2 configs do. ``params_override`` takes what
Model Garden's does: "a.b=1,c.d=[1, 2],f='x,y'" (values parsed as YAML), a YAML/JSON mapping
string, a YAML file path, a dict, or a list of these applied in order.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import yaml

from fpn_tf.configs.base import ConfigError, _expand_dotted, deep_merge
from fpn_tf.configs.experiment import ExperimentConfig
from fpn_tf.file_io import write_text

__all__ = [
    "PARAMS_FILENAME",
    "load_yaml",
    "parse_params_override",
    "translate_legacy_keys",
    "load_config",
    "save_config",
]

PARAMS_FILENAME = "params.yaml"

Override = Union[str, Mapping[str, Any], None]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads '1e-4' as a float (YAML 1.1 wants '1.0e-4'; people write 1e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+
            |[-+]?\.[0-9_]+[eE][-+]?[0-9]+)$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e


def _read_text(path: str) -> str:
    if "://" in path:  # gs://, s3://, ...: only then pay for importing TensorFlow.
        import tensorflow as tf

        with tf.io.gfile.GFile(path, "r") as f:
            return f.read()
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def load_yaml(path: str, _seen: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Reads a config YAML file into a nested dict, resolving ``_base_`` inheritance."""
    seen = list(_seen or [])
    key = os.path.abspath(path) if "://" not in path else path
    if key in seen:
        raise ConfigError(f"{path}: circular _base_ chain: {' -> '.join(seen + [key])}")
    try:
        text = _read_text(path)
    except OSError as e:
        raise ConfigError(f"Cannot read config file {path!r}: {e}") from e
    data = _parse_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config file must hold a mapping at the top, got {type(data).__name__}."
        )
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"{path}: _base_ must be a file path or a list of them, got {bases!r}.", key="_base_"
        )
    merged: Dict[str, Any] = {}
    for base in bases:
        if "://" not in base and not os.path.isabs(base) and "://" not in path:
            base = os.path.join(os.path.dirname(path), base)
        merged = deep_merge(merged, load_yaml(base, seen + [key]))
    return deep_merge(merged, data)


def _split_top_level(text: str) -> List[str]:
    """Splits 'a=1,b=[1,2],c="x,y"' at the commas outside brackets and quotes."""
    parts, current, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quote or depth:
        raise ConfigError(f"params_override {text!r}: unbalanced brackets or quotes.")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _parse_one(override: Override) -> Dict[str, Any]:
    if override is None:
        return {}
    if isinstance(override, Mapping):
        return dict(override)
    if not isinstance(override, str):
        raise ConfigError(
            f"params_override must be a string, a mapping or a list of them, got {override!r}."
        )
    text = override.strip()
    if not text:
        return {}
    if re.search(r"\.ya?ml$", text) and "=" not in text and os.path.exists(text):
        return load_yaml(text)
    if "=" not in text.split(",", 1)[0] or text.startswith("{"):
        # Not "key=value,...": a YAML / JSON mapping, or garbage.
        data = _parse_yaml(text, "params_override")
        if isinstance(data, dict):
            return data
        raise ConfigError(
            f"params_override {override!r} is neither 'key=value[,key=value...]' nor a mapping."
        )
    result: Dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"params_override item {item!r} is not of the form key=value.")
        result[key] = (
            _parse_yaml(value.strip(), f"params_override '{key}'") if value.strip() else None
        )
    return result


def parse_params_override(params_override: Union[Override, Iterable[Override]]) -> Dict[str, Any]:
    """A params_override (string, mapping, YAML file path, or a list of them) -> one nested dict."""
    if params_override is None or isinstance(params_override, (str, Mapping)):
        items = [params_override]
    else:
        items = list(params_override)
    result: Dict[str, Any] = {}
    for item in items:
        # Expand dots now so that later items merge into (rather than replace) earlier sections.
        result = deep_merge(result, _expand_dotted(_parse_one(item)))
    return result


# Where the keys of the sections model.roi / model.mask (before the split by component) live now;
# model.roi's Eq. 1 / RoIAlign keys were the mask branch's too.
_EQ1 = "canonical_size canonical_level min_level max_level aligned level_epsilon align_impl"
_LEGACY_KEYS = {
    "roi": {
        **dict.fromkeys(
            "batch_size_per_image positive_fraction foreground_iou".split(), ["roi_sampler"]
        ),
        **dict.fromkeys(_EQ1.split(), ["roi_aligner", "mask_roi_aligner"]),
        **dict.fromkeys(["output_size", "sampling_ratio"], ["roi_aligner"]),
        **dict.fromkeys(
            "num_fc fc_dims box_weights smooth_l1_beta loss_weight classifier_layout".split(),
            ["box_head"],
        ),
    },
    "mask": {
        **dict.fromkeys(["output_size", "sampling_ratio"], ["mask_roi_aligner"]),
        **dict.fromkeys("num_convs conv_dims class_agnostic loss_weight".split(), ["mask_head"]),
    },
}


# train_data's / eval_data's resize keys -> theirs in the section `resize`.
_LEGACY_RESIZE_KEYS = {
    **{k: k for k in ("short_side", "max_long_side", "pad_multiple")},
    **{"resize_rounding": "rounding", "resize_method": "method"},
}


def translate_legacy_keys(values: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """``values`` with the old keys (of an older model directory's params.yaml) moved to their
    sections now: ``model.roi.*`` / ``model.mask.*`` and ``<split>_data.short_side`` etc.
    (``<split>_data.resize.*``); one warning when there are any."""
    values, read_as = _expand_dotted(values), []
    model = values.get("model")
    if isinstance(model, Mapping) and any(k in model for k in _LEGACY_KEYS):
        model, moved = dict(model), {}
        for old, table in _LEGACY_KEYS.items():
            for key, value in (model.pop(old, None) or {}).items():
                if key not in table:
                    raise ConfigError(
                        f"Unknown config key 'model.{old}.{key}'", key=f"model.{old}.{key}"
                    )
                for new in table[key]:
                    moved = deep_merge(moved, {new: {key: value}})
        read_as += [f"model.{name}" for name in moved]
        values["model"] = deep_merge(moved, model)
    for split in ("train_data", "eval_data"):
        data = values.get(split)
        if isinstance(data, Mapping) and any(k in data for k in _LEGACY_RESIZE_KEYS):
            data = dict(data)
            resize = {new: data.pop(old) for old, new in _LEGACY_RESIZE_KEYS.items() if old in data}
            read_as += [f"{split}.resize.{key}" for key in resize]
            values[split] = deep_merge(data, {"resize": resize})  # over a _base_'s resize
    if read_as:
        logging.getLogger(__name__).warning("%s: old keys, read as %s", source, ", ".join(read_as))
    return values


def load_config(
    config_file: Union[str, Sequence[str], None] = None,
    params_override: Union[Override, Iterable[Override]] = None,
    *,
    num_replicas: Optional[int] = None,
    validate: bool = True,
    check_files: bool = False,
) -> ExperimentConfig:
    """Defaults, then each YAML file in order, then params_override; validated unless told not to.
    A ConfigError names the file or 'params_override' and the key."""
    config = ExperimentConfig()
    files = [config_file] if isinstance(config_file, str) else list(config_file or [])
    for path in files:
        try:
            config = config.override(translate_legacy_keys(load_yaml(path), path))
        except ConfigError as e:
            message = str(e) if str(e).startswith(path) else f"{path}: {e}"
            raise ConfigError(message, key=e.key) from e
    if params_override is not None:
        try:
            values = parse_params_override(params_override)
            config = config.override(translate_legacy_keys(values, "params_override"))
        except ConfigError as e:
            message = str(e) if str(e).startswith("params_override") else f"params_override: {e}"
            raise ConfigError(message, key=e.key) from e
    if validate:
        config.validate(num_replicas=num_replicas, check_files=check_files)
    return config


def save_config(config: ExperimentConfig, model_dir: str, filename: str = PARAMS_FILENAME) -> str:
    """Writes the config as YAML to model_dir/filename (local or gs://); returns the path."""
    text = (
        "# Resolved fpn_tf experiment config; reproduce with:\n"
        f"#   load_config('{filename}') / --config_file=<this file>\n" + config.to_yaml()
    )
    return write_text(model_dir, filename, text)
