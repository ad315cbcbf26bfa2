r"""Side-by-side CPU/GPU benchmark: fpn_tf's R50-FPN Faster R-CNN vs Model Garden's.

    python bench/compare_model_garden.py --what=inference,train,memory,pipeline \
        --batch_sizes=1,2 --image_size=800,1333 --repeats=5 --warmup=2 \
        --output=/tmp/compare.jsonl

Ours: ``fpn_tf.modeling.factory.build_model(ExperimentConfig().model)`` (paper R50-FPN, frozen BN,
90 foreground classes so its box head matches Model Garden's 91-way one), input padded to a
multiple of 32. Theirs: Model Garden's ``fasterrcnn_resnetfpn_coco`` experiment (tf_keras) built
by ``MaskRCNNTask.build_model`` with the overrides in :func:`model_garden_config` (2000/1000
proposals, 512 RoIs, 2x1024 fc and no head convs, RoIAlign 7x7, frozen backbone BN, no sync BN,
no L2 loss) at the input size padded to a multiple of 2**max_level = 64 (the size its parser
gives). Both with random weights and the same synthetic batch (random pixels, 10 random gt boxes
per image padded to 100 rows).

Timed (after ``--warmup`` calls; ``--repeats`` calls alternating ours / theirs, the order flipped
every repeat; medians):
  * inference: ``model(images)`` inside ``tf.function`` (detections at 1000 proposals).
  * train: forward + the four losses + gradients + SGD(momentum 0.9) apply, inside
    ``tf.function``. Ours computes its RPN anchor targets inside the step; Model Garden computes
    them in its input pipeline (``RpnAnchorLabeler`` in the parser), so they are precomputed here
    and their per-image cost is reported separately (``theirs_anchor_labeler_ms_per_image``).
  * memory: peak RSS (/proc VmHWM, see :func:`maxrss_mb`) of a fresh subprocess per model that builds
    it, warms up and runs the step; also the RSS right after building, and the delta.
  * pipeline: runs ``bench/data_throughput.py`` (images/s of our tf.data pipeline).

Every result is one JSON line on stdout (and appended to ``--output``). ``ratio`` is ours/theirs.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

flags.DEFINE_list(
    "what",
    ["inference", "train", "memory", "pipeline"],
    "Any of inference, train, memory, pipeline.",
)
flags.DEFINE_list(
    "batch_sizes", ["1", "2"], "Batch sizes for the train step (inference uses " "the first one)."
)
flags.DEFINE_list("image_size", ["800", "1333"], "Resized image height,width before padding.")
flags.DEFINE_integer("repeats", 5, "Timed calls per model (alternating).")
flags.DEFINE_integer("warmup", 2, "Untimed calls per model first (the first one traces).")
flags.DEFINE_string("output", None, "Append the JSON lines to this file.")
flags.DEFINE_list("models", ["ours", "theirs"], "Which models to run (ratio needs both).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile our tf.functions (ours only).")
flags.DEFINE_enum(
    "mixed_precision",
    "none",
    ["none", "float16", "bfloat16"],
    "Keras mixed-precision policy for ours.",
)
flags.DEFINE_enum(
    "theirs_mixed_precision",
    "none",
    ["none", "float16", "bfloat16"],
    "tf_keras mixed-precision policy for Model Garden's model (its COCO experiment "
    "defaults to bfloat16 on TPU).",
)
flags.DEFINE_integer("num_gt", 10, "Real gt boxes per image.")
flags.DEFINE_integer("max_num_instances", 100, "Padded gt rows per image (both models).")
flags.DEFINE_list(
    "memory_modes",
    ["inference:1", "train:2"],
    "mode:batch pairs measured by --what=memory (one subprocess per model each).",
)
flags.DEFINE_string(
    "fpn_tf_root",
    None,
    "Import fpn_tf from this directory instead (e.g. a "
    "patched copy, to measure a proposed diff).",
)
flags.DEFINE_string(
    "ours_params_override",
    None,
    "A params_override for our model config, e.g. "
    "'model.backbone.fold_frozen_bn=false' (bench/ab_ours.py compares two).",
)
flags.DEFINE_string("tag", "", "Free text copied into every JSON line (e.g. a variant name).")
# Internal: a memory-measuring worker subprocess.
flags.DEFINE_string("worker", None, "internal: 'ours' or 'theirs' (memory subprocess).")
flags.DEFINE_string("worker_mode", "inference", "internal")
flags.DEFINE_integer("worker_batch", 1, "internal")
FLAGS = flags.FLAGS

from bench.common import (  # noqa: E402
    NUM_FG_CLASSES,
    OUR_PAD,
    emit_json_line,
    padded,
    synthetic_batch,
)


# --mixed_precision / --theirs_mixed_precision -> the Keras (tf_keras) global policy name.
MIXED_POLICY = {"none": None, "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


def _proc_status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def maxrss_mb():
    """Peak resident memory of this process. /proc's VmHWM, not getrusage's ru_maxrss: a worker
    started from a parent that already holds GBs inherits the parent's ru_maxrss through fork, and
    exec keeps it; VmHWM belongs to the new address space."""
    peak = _proc_status_mb("VmHWM")
    if peak != peak:  # no /proc (not Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return peak


def current_rss_mb():
    return _proc_status_mb("VmRSS")


def emit(record):
    emit_json_line({"tag": FLAGS.tag, **record}, None if FLAGS.worker else FLAGS.output)


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, resized_hw, params_override=None):
        import keras
        import tensorflow as tf
        from fpn_tf.configs.loader import load_config
        from fpn_tf.modeling.factory import build_model

        self.tf = tf
        self.resized_hw = list(resized_hw)
        self.padded_hw = padded(resized_hw, OUR_PAD)
        policy = MIXED_POLICY[FLAGS.mixed_precision]
        old = keras.config.dtype_policy()
        if policy:
            keras.config.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model_cfg = load_config(params_override=params_override, validate=False).model
            self.model = build_model(
                model_cfg,
                category_ids=list(range(1, NUM_FG_CLASSES + 1)),
                input_shape=tuple(self.padded_hw) + (3,),
            )
        finally:
            keras.config.set_dtype_policy(old)
        p, r = self.model.rpn, self.model.roi_heads
        self.settings = {
            "input": self.padded_hw,
            "pre_nms_train": p.config.pre_nms_top_k_train,
            "post_nms_train": p.config.post_nms_top_k_train,
            "pre_nms_test": p.config.pre_nms_top_k_test,
            "post_nms_test": p.config.post_nms_top_k_test,
            "rois": r.sampler_config.batch_size_per_image,
            "fc": r.box_config.fc_dims,
            "roi_align": r.box_pooler.config.output_size,
            "rpn_nms": p.nms_impl,
            "det_nms": r.nms_impl,
            "jit_compile": FLAGS.jit_compile,
            "mixed_precision": FLAGS.mixed_precision,
            "params": int(sum(int(tf.size(v)) for v in self.model.weights)),
        }
        opt = keras.optimizers.SGD(learning_rate=1e-5, momentum=0.9)
        if policy == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        self.optimizer = opt
        model = self.model

        def infer(features):
            return model(features, training=False)

        def train(features, labels):
            with tf.GradientTape() as tape:
                losses = model.compute_losses(features, labels, training=True)
                loss = losses["total_loss"]
                if hasattr(opt, "scale_loss"):
                    loss = opt.scale_loss(loss)
            variables = model.trainable_variables
            grads = tape.gradient(loss, variables)
            opt.apply(grads, variables)
            return losses["total_loss"]

        self.infer_fn = tf.function(infer, jit_compile=FLAGS.jit_compile)
        self.train_fn = tf.function(train, jit_compile=FLAGS.jit_compile)

    def batch(self, batch):
        tf = self.tf
        images, info, boxes, classes = synthetic_batch(
            batch, self.resized_hw, self.padded_hw, FLAGS.num_gt, FLAGS.max_num_instances
        )
        features = {"images": tf.constant(images), "image_info": tf.constant(info)}
        labels = {
            "gt_boxes": tf.constant(boxes),
            "gt_classes": tf.constant(classes),
            "gt_is_crowd": tf.zeros(classes.shape, tf.bool),
        }
        return features, labels

    def runner(self, mode, batch):
        features, labels = self.batch(batch)
        if mode == "inference":
            return lambda: self.infer_fn(features)["num_detections"].numpy()
        return lambda: self.train_fn(features, labels).numpy()


# --------------------------------------------------------------------------------------------
# Model Garden
# --------------------------------------------------------------------------------------------
def model_garden_config(resized_hw, input_hw):
    from official.core import exp_factory
    import official.vision.configs.maskrcnn  # noqa: F401  (registers the experiments)

    cfg = exp_factory.get_exp_config("fasterrcnn_resnetfpn_coco")
    m = cfg.task.model
    m.input_size = [input_hw[0], input_hw[1], 3]
    m.num_classes = NUM_FG_CLASSES + 1
    m.include_mask = False
    m.roi_generator.pre_nms_top_k = 2000
    m.roi_generator.num_proposals = 2000
    m.roi_generator.test_pre_nms_top_k = 1000
    m.roi_generator.test_num_proposals = 1000
    m.roi_sampler.num_sampled_rois = 512
    m.detection_head.num_convs = 0
    m.detection_head.num_fcs = 2
    m.detection_head.fc_dims = 1024
    m.roi_aligner.crop_size = 7
    m.backbone.resnet.bn_trainable = False
    m.norm_activation.use_sync_bn = False
    cfg.task.losses.l2_weight_decay = 0.0
    cfg.task.freeze_backbone = False
    cfg.runtime.mixed_precision_dtype = "float32"
    return cfg


class Theirs:
    name = "theirs"

    def __init__(self, resized_hw):
        import tensorflow as tf
        import tf_keras
        from official.vision.tasks import maskrcnn as maskrcnn_task

        self.tf = tf
        self.resized_hw = list(resized_hw)
        max_level = model_garden_config(resized_hw, resized_hw).task.model.max_level
        # Its parser pads to a multiple of 2**max_level (its anchors need it).
        self.padded_hw = padded(resized_hw, 2**max_level)
        self.cfg = cfg = model_garden_config(resized_hw, self.padded_hw)
        tf_keras.utils.set_random_seed(0)
        policy = MIXED_POLICY[FLAGS.theirs_mixed_precision]
        old = tf_keras.mixed_precision.global_policy()
        if policy:
            tf_keras.mixed_precision.set_global_policy(policy)
        try:
            self.task = maskrcnn_task.MaskRCNNTask(cfg.task)
            self.model = self.task.build_model()
        finally:
            tf_keras.mixed_precision.set_global_policy(old)
        self.optimizer = tf_keras.optimizers.SGD(learning_rate=1e-5, momentum=0.9)
        if policy == "mixed_float16":
            self.optimizer = tf_keras.mixed_precision.LossScaleOptimizer(self.optimizer)
        m = cfg.task.model
        self.settings = {
            "input": self.padded_hw,
            "pre_nms_train": m.roi_generator.pre_nms_top_k,
            "post_nms_train": m.roi_generator.num_proposals,
            "pre_nms_test": m.roi_generator.test_pre_nms_top_k,
            "post_nms_test": m.roi_generator.test_num_proposals,
            "rois": m.roi_sampler.num_sampled_rois,
            "fc": m.detection_head.fc_dims,
            "num_fcs": m.detection_head.num_fcs,
            "head_convs": m.detection_head.num_convs,
            "roi_align": m.roi_aligner.crop_size,
            "rpn_nms": "per-level, use_batched_nms=%s" % m.roi_generator.use_batched_nms,
            "det_nms": m.detection_generator.nms_version,
            "mixed_precision": FLAGS.theirs_mixed_precision,
            "params": int(sum(int(tf.size(v)) for v in self.model.weights)),
        }
        model, task, opt = self.model, self.task, self.optimizer

        def infer(images, image_shape):
            return model(images, image_shape=image_shape, training=False)

        def train(images, labels):
            return task.train_step((images, labels), model, opt)["loss"]

        self.infer_fn = tf.function(infer)
        self.train_fn = tf.function(train)
        self.labeler_ms_per_image = None

    def anchor_targets(self, boxes, classes):
        """What Model Garden's parser computes per image (timed: it is pipeline work there)."""
        tf = self.tf
        from official.vision.ops import anchor

        m = self.cfg.task.model
        p = self.cfg.task.train_data.parser
        gen = anchor.build_anchor_generator(
            min_level=m.min_level,
            max_level=m.max_level,
            num_scales=m.anchor.num_scales,
            aspect_ratios=m.anchor.aspect_ratios,
            anchor_size=m.anchor.anchor_size,
        )
        labeler = anchor.RpnAnchorLabeler(
            p.rpn_match_threshold,
            p.rpn_unmatched_threshold,
            p.rpn_batch_size_per_im,
            p.rpn_fg_fraction,
        )

        @tf.function
        def one(b, c):
            a = gen(image_size=tuple(self.padded_hw))
            s, t = labeler.label_anchors(a, b, tf.cast(c[:, None], tf.float32))
            return a, s, t

        per_image, times = [], []
        for i in range(boxes.shape[0]):
            n = int((classes[i] > 0).sum())
            b, c = tf.constant(boxes[i, :n]), tf.constant(classes[i, :n])
            one(b, c)  # trace / warm
            t0 = time.perf_counter()
            out = one(b, c)
            tf.nest.map_structure(lambda x: x.numpy(), out)
            times.append((time.perf_counter() - t0) * 1e3)
            per_image.append(out)
        self.labeler_ms_per_image = statistics.median(times)
        anchors = per_image[0][0]
        batch = boxes.shape[0]
        stack = lambda k, lvl: tf.stack([o[k][lvl] for o in per_image])  # noqa: E731
        anchor_boxes = {lvl: tf.tile(v[None], [batch, 1, 1, 1]) for lvl, v in anchors.items()}
        scores = {lvl: stack(1, lvl) for lvl in per_image[0][1]}
        box_t = {lvl: stack(2, lvl) for lvl in per_image[0][2]}
        return anchor_boxes, scores, box_t

    def runner(self, mode, batch):
        tf = self.tf
        import numpy as np

        images, info, boxes, classes = synthetic_batch(
            batch, self.resized_hw, self.padded_hw, FLAGS.num_gt, FLAGS.max_num_instances
        )
        # Model Garden's parser normalises pixels (ImageNet mean/std) before the model.
        mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
        std = np.array([0.229, 0.224, 0.225], np.float32) * 255
        norm = images.copy()
        h, w = self.resized_hw
        norm[:, :h, :w] = (images[:, :h, :w] - mean) / std
        images_t = tf.constant(norm)
        image_shape = tf.constant(info[:, 1, :])
        if mode == "inference":
            return lambda: self.infer_fn(images_t, image_shape)["num_detections"].numpy()
        anchor_boxes, scores, box_t = self.anchor_targets(boxes, classes)
        mg_boxes = np.where(classes[..., None] > 0, boxes, -1.0).astype(np.float32)
        labels = {
            "image_info": tf.constant(info),
            "anchor_boxes": anchor_boxes,
            "gt_boxes": tf.constant(mg_boxes),
            "gt_classes": tf.constant(classes),
            "rpn_score_targets": scores,
            "rpn_box_targets": box_t,
        }
        return lambda: self.train_fn(images_t, labels).numpy()


# --------------------------------------------------------------------------------------------
def time_alternating(runners, repeats, warmup):
    """runners: dict name -> fn. Returns name -> (first call ms, list of timed ms)."""
    first = {}
    for name, fn in runners.items():
        t0 = time.perf_counter()
        fn()
        first[name] = (time.perf_counter() - t0) * 1e3
        for _ in range(warmup - 1):
            fn()
    times = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return first, times


def summarise(what, batch, models, first, times, extra=None):
    rec = {"what": what, "batch": batch}
    for name, m in models.items():
        rec[f"{name}_input"] = m.padded_hw
        rec[f"{name}_ms_median"] = round(statistics.median(times[name]), 1)
        rec[f"{name}_ms_min"] = round(min(times[name]), 1)
        rec[f"{name}_ms_all"] = [round(t, 1) for t in times[name]]
        rec[f"{name}_first_call_ms"] = round(first[name], 1)
    if "ours" in models and "theirs" in models:
        rec["ratio"] = round(rec["ours_ms_median"] / rec["theirs_ms_median"], 3)
    rec.update(extra or {})
    emit(rec)


def use_fpn_tf_root():
    if FLAGS.fpn_tf_root:
        sys.path.insert(0, os.path.abspath(FLAGS.fpn_tf_root))


def run_worker():
    """Fresh process: build one model, warm up, run; print RSS numbers."""
    use_fpn_tf_root()
    import tensorflow as tf

    resized = [int(s) for s in FLAGS.image_size]
    rss0 = current_rss_mb()
    model = Ours(resized, FLAGS.ours_params_override) if FLAGS.worker == "ours" else Theirs(resized)
    rss_built = current_rss_mb()
    fn = model.runner(FLAGS.worker_mode, FLAGS.worker_batch)
    for _ in range(max(FLAGS.warmup, 1) + 1):
        fn()
    print(
        "WORKER "
        + json.dumps(
            {
                "rss_after_import_mb": round(rss0, 1),
                "rss_after_build_mb": round(rss_built, 1),
                "rss_end_mb": round(current_rss_mb(), 1),
                "peak_rss_mb": round(maxrss_mb(), 1),
                "peak_minus_built_mb": round(maxrss_mb() - rss_built, 1),
                "input": model.padded_hw,
                "tf": tf.__version__,
            }
        ),
        flush=True,
    )


def run_memory():
    for spec in FLAGS.memory_modes:
        mode, batch = spec.split(":")
        rec = {"what": "memory", "mode": mode, "batch": int(batch)}
        for name in FLAGS.models:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                f"--worker={name}",
                f"--worker_mode={mode}",
                f"--worker_batch={batch}",
                f"--image_size={','.join(FLAGS.image_size)}",
                f"--warmup={FLAGS.warmup}",
                f"--mixed_precision={FLAGS.mixed_precision}",
                f"--theirs_mixed_precision={FLAGS.theirs_mixed_precision}",
                f"--num_gt={FLAGS.num_gt}",
                f"--max_num_instances={FLAGS.max_num_instances}",
            ]
            if FLAGS.jit_compile:
                cmd.append("--jit_compile")
            if FLAGS.fpn_tf_root:
                cmd.append(f"--fpn_tf_root={FLAGS.fpn_tf_root}")
            if FLAGS.ours_params_override:
                cmd.append(f"--ours_params_override={FLAGS.ours_params_override}")
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [l for l in out.stdout.splitlines() if l.startswith("WORKER ")]
            if not line:
                rec[f"{name}_error"] = out.stderr[-2000:]
                continue
            for k, v in json.loads(line[-1][len("WORKER ") :]).items():
                rec[f"{name}_{k}"] = v
        if "ours_peak_rss_mb" in rec and "theirs_peak_rss_mb" in rec:
            rec["ratio"] = round(rec["ours_peak_rss_mb"] / rec["theirs_peak_rss_mb"], 3)
        emit(rec)


def run_pipeline():
    script = os.path.join(ROOT, "bench", "data_throughput.py")
    if not os.path.exists(script):
        emit({"what": "pipeline", "skipped": "bench/data_throughput.py does not exist"})
        return
    cmd = [
        sys.executable,
        script,
        "--num_images=32",
        "--batch_size=2",
        "--warmup_batches=5",
        "--num_batches=30",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    m = re.search(r"data_throughput: (.*)= ([0-9.]+) images/s", out.stdout + out.stderr)
    if not m:
        emit(
            {
                "what": "pipeline",
                "error": (out.stdout + out.stderr)[-1500:],
                "command": " ".join(cmd),
            }
        )
        return
    emit(
        {
            "what": "pipeline",
            "images_per_s": float(m.group(2)),
            "detail": m.group(1).strip(),
            "command": " ".join(cmd[1:]),
            "note": "ours only: Model Garden's parser needs TFRecords + its anchor labeler; "
            "not run",
        }
    )


def main(argv):
    del argv
    if FLAGS.worker:
        run_worker()
        return
    use_fpn_tf_root()
    import fpn_tf
    import tensorflow as tf

    resized = [int(s) for s in FLAGS.image_size]
    batches = [int(b) for b in FLAGS.batch_sizes]
    emit(
        {
            "what": "environment",
            "tf": tf.__version__,
            "cpus": os.cpu_count(),
            "fpn_tf": os.path.dirname(fpn_tf.__file__),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "threads_inter_intra": [
                tf.config.threading.get_inter_op_parallelism_threads(),
                tf.config.threading.get_intra_op_parallelism_threads(),
            ],
        }
    )
    timed = [w for w in FLAGS.what if w in ("inference", "train")]
    models = {}
    if timed:
        for name in FLAGS.models:
            t0 = time.perf_counter()
            models[name] = (
                Ours(resized, FLAGS.ours_params_override) if name == "ours" else Theirs(resized)
            )
            emit(
                {
                    "what": "settings",
                    "model": name,
                    "build_s": round(time.perf_counter() - t0, 1),
                    **models[name].settings,
                }
            )
    if "inference" in FLAGS.what:
        b = batches[0]
        runners = {n: m.runner("inference", b) for n, m in models.items()}
        first, times = time_alternating(runners, FLAGS.repeats, FLAGS.warmup)
        summarise("inference", b, models, first, times)
    if "train" in FLAGS.what:
        for b in batches:
            runners = {n: m.runner("train", b) for n, m in models.items()}
            first, times = time_alternating(runners, FLAGS.repeats, FLAGS.warmup)
            extra = {}
            if "theirs" in models:
                extra["theirs_anchor_labeler_ms_per_image"] = round(
                    models["theirs"].labeler_ms_per_image, 1
                )
                extra["theirs_ms_plus_labeler"] = round(
                    statistics.median(times["theirs"])
                    + b * extra["theirs_anchor_labeler_ms_per_image"],
                    1,
                )
                if "ours" in models:
                    extra["ratio_vs_theirs_plus_labeler"] = round(
                        statistics.median(times["ours"]) / extra["theirs_ms_plus_labeler"], 3
                    )
            summarise("train", b, models, first, times, extra)
    if "memory" in FLAGS.what:
        run_memory()
    if "pipeline" in FLAGS.what:
        run_pipeline()


if __name__ == "__main__":
    app.run(main)
