"""Dataset category ids (with gaps: COCO's 80 classes use 1..90) <-> contiguous classes ``1..C``
(``0`` is the background), in ascending dataset-id order whatever the file's order. The map
travels with the model (JSON, ``get_config``) and has a graph lookup for exported models.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from fpn_tf.data.errors import DataError, read_json

__all__ = ["CategoryMap", "as_category_map"]


class CategoryMap:
    """Maps COCO-style ``categories`` (integer ``"id"``, ``"name"``; other keys kept) to
    contiguous classes ``1..C`` and back."""

    def __init__(self, categories: Iterable[Mapping[str, Any]]):
        cats = []
        seen = set()
        for i, cat in enumerate(categories):
            if not isinstance(cat, Mapping) or "id" not in cat or "name" not in cat:
                raise DataError(f"category #{i} must be a dict with 'id' and 'name', got {cat!r}")
            cid = cat["id"]
            if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)):
                raise DataError(f"category #{i}: 'id' must be an integer, got {cid!r}")
            cid = int(cid)
            if cid <= 0:
                raise DataError(
                    f"category #{i}: 'id' must be positive (0 is the background), got {cid}"
                )
            if cid in seen:
                raise DataError(f"category id {cid} is listed more than once")
            seen.add(cid)
            entry = {k: v for k, v in dict(cat).items() if k != "contiguous_id"}
            entry["id"] = cid
            entry["name"] = str(cat["name"])
            cats.append(entry)
        if not cats:
            raise DataError("a category map needs at least one category")
        cats.sort(key=lambda c: c["id"])
        self._categories = tuple(cats)
        self._dataset_ids = tuple(c["id"] for c in cats)
        self._names = tuple(c["name"] for c in cats)
        self._to_contiguous = {cid: i + 1 for i, cid in enumerate(self._dataset_ids)}

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "CategoryMap":
        """Reads a map written by :meth:`to_json`, or any COCO annotation file."""
        source = os.fspath(path)
        data = read_json(source, "category map file")
        if not isinstance(data, dict) or "categories" not in data:
            raise DataError(f"{source}: no 'categories' list")
        try:
            return cls(data["categories"])
        except DataError as e:
            raise DataError(f"{source}: {e}") from e

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "CategoryMap":
        """Inverse of :meth:`get_config`."""
        return cls(config["categories"])

    def get_config(self) -> dict[str, Any]:
        """A JSON-able dict; ``CategoryMap.from_config(m.get_config()) == m``."""
        return {
            "categories": [dict(c, contiguous_id=i + 1) for i, c in enumerate(self._categories)]
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The map as JSON text (a COCO-style ``categories`` list with ``contiguous_id``),
        written to ``path`` when given."""
        text = json.dumps(self.get_config(), indent=1, sort_keys=True)
        if path is not None:
            path = os.fspath(path)
            parent = os.path.dirname(path)
            if parent:
                tf.io.gfile.makedirs(parent)
            with tf.io.gfile.GFile(path, "w") as f:
                f.write(text + "\n")
        return text

    @property
    def num_classes(self) -> int:
        """C, the number of foreground classes (the model has C + 1 outputs)."""
        return len(self._dataset_ids)

    @property
    def dataset_ids(self) -> tuple[int, ...]:
        """Dataset ids in contiguous order: ``dataset_ids[k - 1]`` is class k."""
        return self._dataset_ids

    @property
    def names(self) -> tuple[str, ...]:
        """Names in contiguous order: ``names[k - 1]`` is class k's name."""
        return self._names

    @property
    def categories(self) -> tuple[dict[str, Any], ...]:
        return tuple(dict(c) for c in self._categories)

    def __len__(self) -> int:
        return self.num_classes

    def __contains__(self, dataset_id: int) -> bool:
        return int(dataset_id) in self._to_contiguous

    def to_contiguous(self, dataset_id: int) -> int:
        """Dataset id -> contiguous class in 1..C; KeyError for an unknown id."""
        try:
            return self._to_contiguous[int(dataset_id)]
        except KeyError:
            known = list(self._dataset_ids)
            raise KeyError(
                f"unknown dataset category id {dataset_id}; known ids: {known}"
            ) from None

    def to_dataset_id(self, contiguous_id: int) -> int:
        """Contiguous class in 1..C -> dataset id; KeyError outside 1..C."""
        k = int(contiguous_id)
        if not 1 <= k <= self.num_classes:
            raise KeyError(f"contiguous class {k} is outside 1..{self.num_classes}")
        return self._dataset_ids[k - 1]

    def dataset_id_to_name(self) -> dict[int, str]:
        return dict(zip(self._dataset_ids, self._names))

    def dataset_to_contiguous_ids(self, dataset_ids: tf.Tensor) -> tf.Tensor:
        """int32 contiguous classes of an integer tensor of dataset ids, in a graph; unknown -> -1."""
        # A dense table by dataset id (small ints): a gather needs no table initialisation.
        max_id = max(self._dataset_ids)
        dense = np.full([max_id + 1], -1, np.int32)
        for cid, k in self._to_contiguous.items():
            dense[cid] = k
        table = tf.constant(dense)
        ids = tf.cast(dataset_ids, tf.int64)
        inside = (ids >= 0) & (ids <= max_id)
        k = tf.gather(table, tf.where(inside, ids, tf.zeros_like(ids)))
        return tf.where(inside, k, -tf.ones_like(k))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CategoryMap) and self._categories == other._categories

    def __hash__(self) -> int:
        return hash(self._dataset_ids + self._names)

    def __repr__(self) -> str:
        pairs = ", ".join(f"{cid}:{n!r}" for cid, n in zip(self._dataset_ids[:6], self._names[:6]))
        more = ", ..." if self.num_classes > 6 else ""
        return f"CategoryMap(num_classes={self.num_classes}, {{{pairs}{more}}})"


def as_category_map(
    value: "CategoryMap | str | os.PathLike | Sequence[Mapping] | Mapping",
) -> CategoryMap:
    """Accepts a CategoryMap, a JSON path, a get_config() dict or a list."""
    if isinstance(value, CategoryMap):
        return value
    if isinstance(value, (str, os.PathLike)):
        return CategoryMap.from_json(value)
    if isinstance(value, Mapping):
        return CategoryMap.from_config(value)
    return CategoryMap(value)
