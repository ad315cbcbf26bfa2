"""A published COCO checkpoint -> a model directory like a training run's: ``params.yaml``,
``category_map.json`` (COCO's 80), ``ckpt-0``, ``conversion.json`` (source, SHA-256, counts) and
optionally ``saved_model/``, written to a ``.partial`` sibling and renamed at the end, so a
failure never leaves a partly converted model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time

from absl import logging

from fpn_tf.conversion import detectron2 as detectron2_layout
from fpn_tf.conversion import torchvision as torchvision_layout
from fpn_tf.conversion.checkpoint_reader import (
    ConversionError,
    StateDict,
    read_detectron2_pickle,
    read_torch_checkpoint,
)

SOURCES = ("torchvision", "detectron2")
# The repository's configs/: each source's reference config.
CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
CONVERSION_FILENAME = "conversion.json"
SAVED_MODEL_DIRNAME = "saved_model"


@dataclasses.dataclass
class ConversionReport:
    output_dir: str
    source: str
    checkpoint: str
    sha256: str
    num_arrays: int
    num_values: int
    seconds: float


def file_digests(path: str) -> tuple[str, str]:
    """(SHA-256, MD5) hex digests of a file."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


# The publishers' file names carry a digest prefix: torchvision's the SHA-256's
# (``..._coco-258fb6c6.pth``), detectron2's model zoo the MD5's (``model_final_b275ba.pkl``).
_NAMED_DIGESTS = (
    (r"-([0-9a-f]{8,64})\.pth$", "SHA-256", 0),
    (r"^model_final_([0-9a-f]{6})\.pkl$", "MD5", 1),
)


def check_named_digest(path: str, digests: tuple[str, str]) -> None:
    """Refuses a truncated or altered download whose name carries its publisher's digest."""
    for pattern, kind, index in _NAMED_DIGESTS:
        match = re.search(pattern, os.path.basename(path))
        if match and not digests[index].startswith(match.group(1)):
            raise ConversionError(
                f"{path}: its {kind} {digests[index][:12]}... does not start with the "
                f"{match.group(1)} its name promises (a truncated or altered download?)"
            )


def _read(source: str, path: str) -> dict:
    if source == "torchvision" or not path.endswith(".pkl"):
        return read_torch_checkpoint(path)
    return read_detectron2_pickle(path)


def load_weights(model, source: str, checkpoint: str, config, arrays=None) -> tuple[int, int]:
    """Assigns every weight of ``model`` from ``checkpoint`` (or its already read ``arrays``),
    all or nothing; returns (#arrays, #values)."""
    if source not in SOURCES:
        raise ConversionError(f"--source must be one of {SOURCES}, got {source!r}")
    state = StateDict(_read(source, checkpoint) if arrays is None else arrays, checkpoint)
    if source == "torchvision":
        pending = torchvision_layout.assignments(model, state, config.model.backbone.type)
        what = torchvision_layout.what(model)
    else:
        pending = detectron2_layout.assignments(model, state, config.model.backbone)
        what = detectron2_layout.what(model)
    num_values = pending.check_and_assign(what, model)
    return len(state.arrays), num_values


def reference_config_file(source: str) -> str:
    """The config under which ``source``'s weights compute what its publisher's code does."""
    return os.path.join(CONFIG_DIR, f"coco_r50_fpn_{source}.yaml")


def check_reference_switches(source: str, config) -> None:
    """Refuses a ``config`` whose weight switches differ from ``source``'s reference config:
    every shape would fit and the model would compute something else."""
    from fpn_tf.configs.loader import load_config  # pylint: disable=g-import-not-at-top
    from fpn_tf.modeling import model_dir  # pylint: disable=g-import-not-at-top

    path = reference_config_file(source)
    if not os.path.isfile(path):
        logging.warning("%s not found: the config's switches are not checked against it", path)
        return
    reference = f"{source}'s reference config {os.path.basename(path)}"
    model_dir.check_same_weight_switches(
        config.model, load_config(path).model, what="--config_file", source=reference
    )


def convert_checkpoint(
    source: str,
    checkpoint: str,
    output_dir: str,
    config,
    *,
    export_saved_model: bool = True,
) -> ConversionReport:
    """Converts ``checkpoint`` into ``output_dir`` with ``config``'s architecture. ``config`` is
    updated in place to what params.yaml gets: 80 classes, no backbone weights, and the file's
    architecture (``mask_rcnn`` when it has mask-head keys)."""
    # pylint: disable=g-import-not-at-top
    from fpn_tf.data.coco_categories import coco_category_map
    from fpn_tf.modeling import model_dir
    from fpn_tf.modeling.factory import build_model
    from fpn_tf.serving import export as export_lib

    start = time.time()
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"{output_dir} exists and is not empty: remove it or choose another")
    if not os.path.isfile(checkpoint):
        raise ConversionError(f"{checkpoint}: no such file")
    digests = file_digests(checkpoint)
    sha256 = digests[0]
    logging.info("Converting %s (%s, SHA-256 %s)", checkpoint, source, sha256)
    check_named_digest(checkpoint, digests)

    if source not in SOURCES:
        raise ConversionError(f"--source must be one of {SOURCES}, got {source!r}")
    check_reference_switches(source, config)  # before reading a file of gigabytes
    arrays = _read(source, checkpoint)  # an unreadable file fails before the model is built
    # The file says what it is: Faster R-CNN, or Mask R-CNN when it has mask-head keys.
    layouts = {"torchvision": torchvision_layout, "detectron2": detectron2_layout}
    architecture = layouts[source].architecture(arrays)
    if architecture != config.model.architecture:
        logging.info(
            "The checkpoint is a %s: model.architecture %s (the config said %s)",
            architecture, architecture, config.model.architecture,
        )  # fmt: skip
        config.model.architecture = architecture
    category_map = coco_category_map()
    config.model.backbone.weights = None  # every weight comes from the checkpoint
    config.model.num_classes = category_map.num_classes
    model = build_model(config.model, category_ids=list(category_map.dataset_ids))
    num_arrays, num_values = load_weights(model, source, checkpoint, config, arrays)
    logging.info("Converted %d arrays (%d values) into the detector", num_arrays, num_values)

    partial = output_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        model_dir.write_model_dir(partial, config, category_map)
        model_dir.save_model_checkpoint(model, partial, 0)
        if export_saved_model:
            logging.info("Exporting the SavedModel (a minute or two for a ResNet-50)")
            export_lib.export_saved_model(
                model, os.path.join(partial, SAVED_MODEL_DIRNAME), category_map,
                config.eval_data.resize,
            )  # fmt: skip
        report = ConversionReport(
            output_dir, source, os.path.abspath(checkpoint), sha256, num_arrays, num_values,
            seconds=round(time.time() - start, 1),
        )  # fmt: skip
        with open(os.path.join(partial, CONVERSION_FILENAME), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(report), f, indent=1)
            f.write("\n")
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty (checked above)
        os.replace(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logging.info("Wrote %s in %.1f s", output_dir, time.time() - start)
    return report
