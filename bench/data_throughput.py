r"""Images/s of the training input pipeline (decode, flip, resize, pad, batch).

    python bench/data_throughput.py --num_images=64 --height=480 --width=640 \
        --batch_size=2 --warmup_batches=10 --num_batches=60

Writes synthetic COCO-like JPEGs (640x480, a few shapes each) to a temporary
folder (or --workdir), builds ``build_dataset(..., training=True)`` at the
paper's 800 / 1333 resize, runs ``--warmup_batches`` batches, then times
``--num_batches`` batches and prints images/s. ``--source=tfrecord`` first
converts the images to TFRecords and reads those.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_integer("num_images", 64, "Distinct synthetic images.")
flags.DEFINE_integer("height", 480, "Image height.")
flags.DEFINE_integer("width", 640, "Image width.")
flags.DEFINE_integer("batch_size", 2, "Batch size.")
flags.DEFINE_integer("warmup_batches", 10, "Batches before timing.")
flags.DEFINE_integer("num_batches", 60, "Timed batches.")
flags.DEFINE_integer("short_side", 800, "Resize: shorter side.")
flags.DEFINE_integer("max_long_side", 1333, "Resize: longest side cap.")
flags.DEFINE_enum(
    "padding_mode", "orientation", ["orientation", "square", "batch"], "Padding mode."
)
flags.DEFINE_enum("source", "coco", ["coco", "tfrecord"], "Reader.")
flags.DEFINE_integer("num_parallel_calls", -1, "Parallel map calls (-1: tf.data.AUTOTUNE).")
flags.DEFINE_string("workdir", None, "Where to write images (default: temp).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from fpn_tf.configs import DataConfig  # pylint: disable=g-import-not-at-top
    from fpn_tf.data import pipeline, synthetic  # pylint: disable=g-import-not-at-top

    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="fpn_data_bench_")
    paths = synthetic.generate_split(
        workdir,
        "bench",
        FLAGS.num_images,
        seed=0,
        fixed_hw=(FLAGS.height, FLAGS.width),
        png_every=0,
        subfolder_every=0,
        max_object_size=min(200, FLAGS.height // 2),
    )
    if FLAGS.source == "coco":
        source = pipeline.load_source(
            pipeline.CocoSource(paths["annotation_file"], paths["image_dir"])
        )
    else:
        from fpn_tf.data import convert_coco  # pylint: disable=g-import-not-at-top

        result = convert_coco.convert_coco_to_tfrecords(
            paths["annotation_file"],
            paths["image_dir"],
            os.path.join(workdir, "tfrecords", "bench"),
            num_shards=4,
        )
        source = pipeline.load_source(pipeline.TfRecordSource(result.file_pattern))

    data_config = DataConfig(
        source="synthetic",  # the settings only: the source is loaded above
        global_batch_size=FLAGS.batch_size,
        padding_mode=FLAGS.padding_mode,
    ).override({"resize": {"short_side": FLAGS.short_side, "max_long_side": FLAGS.max_long_side}})
    ds = pipeline.build_dataset(
        source, data_config, training=True, seed=0, num_parallel_calls=FLAGS.num_parallel_calls
    )
    it = iter(ds)
    for _ in range(FLAGS.warmup_batches):
        features, _ = next(it)
    shape = tuple(features["images"].shape)
    start = time.perf_counter()
    for _ in range(FLAGS.num_batches):
        features, _ = next(it)
    features["images"].numpy()  # make sure the last batch is materialised
    seconds = time.perf_counter() - start
    n = FLAGS.num_batches * FLAGS.batch_size
    logging.info("done")
    print(
        f"data_throughput: source={FLAGS.source} image {FLAGS.height}x"
        f"{FLAGS.width} -> batch {shape} padding={FLAGS.padding_mode} "
        f"batch_size={FLAGS.batch_size} cpus={os.cpu_count()} "
        f"num_parallel_calls={FLAGS.num_parallel_calls} "
        f"tf={tf.__version__}: {n} images in {seconds:.2f} s = "
        f"{n / seconds:.1f} images/s"
    )


if __name__ == "__main__":
    app.run(main)
