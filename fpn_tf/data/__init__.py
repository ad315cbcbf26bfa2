"""Input pipeline: ``load_source`` -> a loaded COCO or TFRecord source, ``build_dataset`` -> its
batches of (features, labels). Names are imported lazily, so ``python -m fpn_tf.data.synthetic``
does not load TensorFlow."""

import importlib

_EXPORTS = {
    "CategoryMap": "fpn_tf.data.category_map",
    "CocoIndex": "fpn_tf.data.coco_reader",
    "load_coco": "fpn_tf.data.coco_reader",
    "DataError": "fpn_tf.data.errors",
    "RunTimeDrops": "fpn_tf.data.errors",
    "TfRecordIndex": "fpn_tf.data.tfrecord_reader",
    "CocoSource": "fpn_tf.data.pipeline",
    "TfRecordSource": "fpn_tf.data.pipeline",
    "build_dataset": "fpn_tf.data.pipeline",
    "load_source": "fpn_tf.data.pipeline",
    "source_from_config": "fpn_tf.data.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fpn_tf.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
