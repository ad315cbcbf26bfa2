"""The machinery behind the experiment config: strict typed dataclasses, overrides, value checks.

A config section is a dataclass deriving from :class:`Config`. Its fields are plain typed values
(``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``List[...]``, ``Optional[...]``) or
sub-sections, and each leaf may declare value checks with :func:`field`::

    @dataclasses.dataclass
    class RPNConfig(Config):
        nms_iou: float = field(0.7, unit_interval)

An unknown key or a value of the wrong type (only ``int`` -> ``float`` is converted) raises
:class:`ConfigError` naming the dotted key (and the nearest valid one);
:meth:`Config.validate_section` applies the declared checks, then each section's
``_check_values`` (cross-field rules): ``Config key 'model.rpn.nms_iou' must be in [0, 1], got
1.5.`` Standard library and PyYAML only, so configs load in milliseconds.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import typing
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Tuple

import yaml

from fpn_tf.errors import UserError

__all__ = [
    "ConfigError",
    "Config",
    "Check",
    "field",
    "positive",
    "non_negative",
    "unit_interval",
    "non_empty",
    "unique",
    "increasing",
    "in_range",
    "at_least",
    "length",
    "each",
    "deep_merge",
]


class ConfigError(UserError, ValueError):
    """An invalid configuration. ``key`` is the full dotted key at fault (or None)."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


_NoneType = type(None)


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
    """`value` checked against the annotation `tp` (ints widened to float, tuples to lists,
    mappings to dataclass sections)."""
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
    if tp in (bool, int, float, str):
        ok = isinstance(value, (int, float) if tp is float else tp)
        if ok and (tp in (bool, str) or not isinstance(value, bool)):
            return float(value) if tp is float else value
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
        close = difflib.get_close_matches(
            value, [a for a in allowed_values if isinstance(a, str)], 1, 0.5
        )
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
            raise ConfigError(
                f"Malformed config key '{key_prefix}{raw_key}'.", key=key_prefix + raw_key
            )
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
    list,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)


def _require(condition: bool, key: str, message: str):
    """Raises ConfigError("Config key '<key>' <message>") unless `condition`: cross-field rules."""
    if not condition:
        raise ConfigError(f"Config key '{key}' {message}", key=key)


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule on one field's value; `requirement` completes "must be ...", e.g. "in [0, 1]".
    The null value of an Optional field is never tested."""

    test: Callable[[Any], bool]
    requirement: str

    def error(self, key: str, value: Any, nullable: bool = False) -> ConfigError:
        requirement = self.requirement
        if nullable and "null" not in requirement:
            requirement += " or null"
        return ConfigError(f"Config key '{key}' must be {requirement}, got {value!r}.", key=key)


def in_range(lo: float, hi: float, ends: str = "[]") -> Check:
    """lo <= value <= hi; `ends` says which bounds are included: "[]", "[)", "(]" or "()"."""
    if ends not in ("[]", "[)", "(]", "()"):
        raise ValueError(f"ends must be '[]', '[)', '(]' or '()', got {ends!r}")
    left_closed, right_closed = ends[0] == "[", ends[1] == "]"

    def test(value):
        above = lo <= value if left_closed else lo < value
        below = value <= hi if right_closed else value < hi
        return above and below

    return Check(test, f"in {ends[0]}{lo}, {hi}{ends[1]}")


def at_least(lo: float) -> Check:
    return Check(lambda value: value >= lo, f">= {lo}")


def length(n: int, entries: str = "") -> Check:
    """A list of exactly `n` entries; `entries` names them in the message, e.g. "conv2..conv5"."""
    return Check(
        lambda value: len(value) == n,
        f"a list of {n} entries" + (f" ({entries})" if entries else ""),
    )


def each(check: Check) -> Check:
    """`check` holds for every entry of a list."""
    return Check(
        lambda value: all(check.test(v) for v in value), f"{check.requirement} in every entry"
    )


positive = Check(lambda value: value > 0, "positive")
non_negative = at_least(0)
unit_interval = in_range(0, 1)
non_empty = Check(lambda value: len(value) > 0, "a non-empty list")
unique = Check(lambda value: len(set(value)) == len(value), "a list without duplicates")
increasing = Check(
    lambda value: all(a < b for a, b in zip(value, value[1:])), "strictly increasing"
)


def field(default: Any, *checks: Check):
    """A config field: its default (lists copied per instance) and its checks, run in order."""
    metadata = {"checks": checks}
    if isinstance(default, list):
        return dataclasses.field(
            default_factory=functools.partial(list, default), metadata=metadata
        )
    return dataclasses.field(default=default, metadata=metadata)


def _declared_checks(cls, prefix: str = "") -> Dict[str, Tuple[Check, ...]]:
    checks = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            checks.update(_declared_checks(hints[f.name], prefix + f.name + "."))
        elif f.metadata.get("checks"):
            checks[prefix + f.name] = f.metadata["checks"]
    return checks


def _is_nullable(tp) -> bool:
    return typing.get_origin(tp) is typing.Union and _NoneType in typing.get_args(tp)


class Config:
    """Base of every config section: types are checked at construction, and again (with the
    value checks) by :meth:`validate_section` after later assignments."""

    def __post_init__(self):
        self._check_types("")

    def to_dict(self) -> Dict[str, Any]:
        """A nested dict of plain Python values (YAML / JSON safe)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Block-style YAML (lists inline), readable by fpn_tf.configs.loader and plain yaml."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, width=100)

    @classmethod
    def of(cls, value):
        """A checked copy of the section ``value`` (a `cls`, or its dict as ``get_config``
        stores it): a layer holding its settings never changes its caller's config."""
        section = copy.deepcopy(value) if isinstance(value, cls) else cls.from_dict(value)
        return section.validate_section()

    @classmethod
    def from_dict(cls, values: Optional[Mapping] = None):
        """Defaults of `cls` overridden by `values` (which may be partial; dotted keys allowed)."""
        return cls()._apply(values or {}, "")

    def override(self, values: Optional[Mapping]):
        """A copy of this config with `values` (nested and/or dotted keys) applied."""
        return copy.deepcopy(self)._apply(values or {}, "")

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

    def _check_fields(self, prefix: str):
        """The checks declared with each leaf field of this section (not its sub-sections)."""
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            for check in f.metadata.get("checks", ()):
                if not check.test(value):
                    raise check.error(prefix + f.name, value, _is_nullable(hints[f.name]))

    def _check_values(self, prefix: str):
        """Rules that relate several fields; overridden by the sections that have any."""

    def _walk(self, prefix: str):
        """Sub-sections first, so that a section's own rules fire before rules spanning sections."""
        for name in _field_names(type(self)):
            value = getattr(self, name)
            if isinstance(value, Config):
                yield from value._walk(prefix + name + ".")
        yield prefix, self

    def validate_section(self, prefix: str = ""):
        """Types, then each section's field checks and cross-field rules, sub-sections first;
        `prefix` is this section's dotted key plus "."."""
        self._check_types(prefix)
        for sub_prefix, section in self._walk(prefix):
            section._check_fields(sub_prefix)
            section._check_values(sub_prefix)
        return self

    @classmethod
    def declared_checks(cls) -> Dict[str, Tuple[Check, ...]]:
        """Every dotted leaf key of this section (and below) that declares checks -> its checks."""
        return _declared_checks(cls)
