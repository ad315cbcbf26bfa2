"""CategoryMap: non-contiguous dataset ids <-> contiguous 1..C."""

import json

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.data.category_map import CategoryMap, as_category_map
from fpn_tf.data.errors import DataError

# Listed out of order on purpose: contiguous order follows the ids.
CATS = [
    {"id": 9, "name": "ring"},
    {"id": 1, "name": "circle"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 3, "name": "square"},
]


def test_mapping_follows_sorted_dataset_ids():
    m = CategoryMap(CATS)
    assert m.num_classes == 4 and len(m) == 4
    assert m.dataset_ids == (1, 3, 7, 9)
    assert m.names == ("circle", "square", "triangle", "ring")
    assert [m.to_contiguous(i) for i in (1, 3, 7, 9)] == [1, 2, 3, 4]
    assert [m.to_dataset_id(k) for k in (1, 2, 3, 4)] == [1, 3, 7, 9]
    assert 7 in m and 2 not in m
    with pytest.raises(KeyError, match="unknown dataset category id 2"):
        m.to_contiguous(2)
    with pytest.raises(KeyError):
        m.to_dataset_id(0)
    with pytest.raises(KeyError):
        m.to_dataset_id(5)


def test_json_and_config_round_trip(tmp_path):
    m = CategoryMap(CATS)
    path = tmp_path / "sub" / "category_map.json"
    text = m.to_json(path)
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    assert [c["contiguous_id"] for c in data["categories"]] == [1, 2, 3, 4]
    assert data["categories"][2]["supercategory"] == "shape"
    assert CategoryMap.from_json(path) == m
    assert CategoryMap.from_config(m.get_config()) == m
    assert as_category_map(str(path)) == m
    assert as_category_map(m.get_config()) == m
    # Any COCO annotation file is a category map source too.
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": CATS}))
    assert CategoryMap.from_json(coco) == m


def test_tf_lookups_inside_a_graph():
    m = CategoryMap(CATS)

    to_classes = tf.function(m.dataset_to_contiguous_ids)(
        tf.constant([1, 3, 7, 9, 2, 100, 0, -5], tf.int64)
    )
    np.testing.assert_array_equal(to_classes, [1, 2, 3, 4, -1, -1, -1, -1])
    assert to_classes.dtype == tf.int32


def test_bad_categories_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="category id 3 is listed more"):
        CategoryMap([{"id": 3, "name": "a"}, {"id": 3, "name": "b"}])
    with pytest.raises(DataError, match="'id' and 'name'"):
        CategoryMap([{"id": 3}])
    with pytest.raises(DataError, match="positive"):
        CategoryMap([{"id": 0, "name": "background"}])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        CategoryMap.from_json(bad)
