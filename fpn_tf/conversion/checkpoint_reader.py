"""Reading published PyTorch checkpoints into ``{key: float32 ndarray}``, and tracking the keys.

A ``.pth`` is read with ``torch.load(weights_only=True)``, a detectron2 ``.pkl`` with an unpickler
that only rebuilds NumPy arrays and dicts: neither runs code from the file. `StateDict` remembers
which keys were taken, so every key must go somewhere and none is invented.
"""

from __future__ import annotations

import collections
import os
import pickle
from typing import Iterable, Mapping

import numpy as np

from fpn_tf.errors import UserError

__all__ = ["ConversionError", "StateDict", "read_torch_checkpoint", "read_detectron2_pickle"]


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted (unreadable, another architecture, keys missing)."""


def _summarise(keys: Iterable[str], limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


class StateDict:
    """Arrays by key; `take` marks a key used, `check_all_used` fails on keys left over.
    Keys with ``ignored_suffixes`` are bookkeeping, not weights: counted as used."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        path: str,
        ignored_suffixes: tuple[str, ...] = ("num_batches_tracked",),
    ):
        self.arrays = dict(arrays)
        self.path = path
        self.used = {k for k in self.arrays if k.endswith(ignored_suffixes)}
        self.missing: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def take(self, key: str) -> np.ndarray | None:
        """The array of ``key`` (marked used), or None after recording it as missing."""
        if key not in self.arrays:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.arrays[key]

    def rename(self, old: str, new: str) -> None:
        """Moves ``old`` to ``new`` (older checkpoints spell some keys differently)."""
        if old in self.arrays and new not in self.arrays:
            self.arrays[new] = self.arrays.pop(old)

    def check_all_used(self, what: str) -> None:
        """Raises one ConversionError naming missing and unexpected keys, if any."""
        unused = set(self.arrays) - self.used
        problems = []
        if self.missing:
            problems.append(f"missing keys {_summarise(self.missing)}")
        if unused:
            problems.append(f"unexpected keys {_summarise(unused)}")
        if problems:
            raise ConversionError(f"{self.path} is not a {what} checkpoint: {'; '.join(problems)}")


# bool, int, uint, float: other arrays are refused by name, not inside the float conversion.
_NUMERIC_KINDS = "biuf"


def _as_arrays(state: Mapping, path: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().float().numpy()
        if not isinstance(value, np.ndarray):
            raise ConversionError(
                f"{path}: key {key!r} holds a {type(value).__name__}, not an array"
            )
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise ConversionError(
                f"{path}: key {key!r} holds a NumPy array of dtype={value.dtype} "
                f"{tuple(value.shape)}, not numbers (a weight is a bool, int or float array)"
            )
        out[str(key)] = np.asarray(value, dtype=np.float32)
    return out


def _unwrap(obj, path: str) -> Mapping:
    """The state dict inside a checkpoint object ({"model": ...}, {"state_dict": ...} or itself)."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                return obj[wrapper]
        if obj and all(isinstance(k, str) for k in obj):
            return obj
    raise ConversionError(f"{path}: holds no state dict (a mapping of weight names to arrays)")


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path}: the file is empty")


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """``{key: float32 array}`` of a ``torch.save`` state dict (needs torch)."""
    _check_file(path)
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ConversionError(
            f"reading {path} needs PyTorch: pip install -e '.[torch]' ({e})"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first[:200]}"
        ) from None
    return _as_arrays(_unwrap(obj, path), path)


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only NumPy arrays, dtypes and dicts: a pickle asking for anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a NumPy array)")
        return super().find_class(module, name)


def read_detectron2_pickle(path: str) -> dict[str, np.ndarray]:
    """``{key: float32 array}`` of a detectron2 model-zoo ``.pkl`` (no torch needed)."""
    _check_file(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not a pickle of arrays
        raise ConversionError(
            f"{path}: not a readable detectron2 .pkl (truncated or corrupt?): "
            f"{type(e).__name__}: {str(e)[:200]}"
        ) from None
    if isinstance(obj, Mapping) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds no state dict (a mapping of weight names to arrays)")
    return _as_arrays(collections.OrderedDict(obj), path)
