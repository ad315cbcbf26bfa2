"""The train / evaluate / export loop of an experiment.

Training is ``model.fit`` on an endless per-replica stream, the policies as callbacks. A run
resumes from the newest readable checkpoint of ``model_dir`` (the ``CheckpointManager`` index is
written last, atomically) and reshuffles its data with ``train.seed + step``; a run from step 0
first applies ``model.init_checkpoint``.
"""

from __future__ import annotations

import os
import time

from absl import logging
import keras
import tensorflow as tf

from fpn_tf.configs.experiment import ConfigError
from fpn_tf.data import pipeline
from fpn_tf.data.category_map import CategoryMap
from fpn_tf.evaluation.box_images import summary_images
from fpn_tf.data.segmentation_check import MASK_REASONS
from fpn_tf.errors import UserError
from fpn_tf.evaluation.run import checked_groundtruth, evaluate_detector
from fpn_tf.modeling import model_dir as model_dir_lib
from fpn_tf.modeling.factory import build_model
from fpn_tf.training import callbacks as cb
from fpn_tf.training.callbacks import NonFiniteLossError  # noqa: F401 - part of the API
from fpn_tf.training.init_checkpoint import load_init_checkpoint
from fpn_tf.training.optimizers import build_optimizer
from fpn_tf.training.strategy import build_strategy, is_chief

# The architectures that train on each object's mask.
MASK_ARCHITECTURES = ("mask_rcnn", "segment_proposals")


class CheckpointError(UserError, RuntimeError):
    """No checkpoint of model_dir can be restored."""


def prepare_synthetic_data(cfg, evaluate_only: bool = False) -> None:
    """Generates the synthetic splits a config asks for (once) and points the config at them;
    ``evaluate_only``: the held-out split only, which must exist (an evaluation writes nothing
    outside its model directory)."""
    from fpn_tf.data import synthetic  # numpy + PIL only

    splits = (("train", cfg.train_data), ("val", cfg.eval_data))
    for split, data_cfg in splits[1:] if evaluate_only else splits:
        if data_cfg.source != "synthetic":
            continue
        s = data_cfg.synthetic
        out_dir = s.output_dir or "runs/synthetic_shapes"
        ann = os.path.join(out_dir, "annotations", f"instances_{split}.json")
        first_id = 1 if split == "train" else 10_000_000
        if os.path.exists(ann):
            logging.info("Synthetic %s split already at %s", split, ann)
            paths = {"annotation_file": ann, "image_dir": os.path.join(out_dir, split)}
        elif evaluate_only:
            raise ConfigError(
                f"the synthetic {split} split is not at {ann}: an evaluation does not generate "
                "data; point eval_data at a data set (or train first)",
                key="eval_data.synthetic.output_dir",
            )
        else:
            start = time.time()
            logging.info("Generating %d synthetic %s images into %s", s.num_images, split, out_dir)
            paths = synthetic.generate_split(
                out_dir, split, s.num_images, seed=s.seed, image_size=tuple(s.image_size),
                max_objects=s.max_objects, first_image_id=first_id,
            )  # fmt: skip
            logging.info("... done in %.1f s", time.time() - start)
        data_cfg.annotation_file = paths["annotation_file"]
        data_cfg.image_dir = paths["image_dir"]
        data_cfg.source = "coco"


class Trainer:
    """Builds strategy, data, model, optimizer and checkpoint from an `ExperimentConfig`;
    ``model_dir`` receives checkpoints, params.yaml, category_map.json, summaries, metrics."""

    def __init__(self, cfg, model_dir: str, evaluate_only: bool = False):
        self.cfg = cfg
        self.model_dir = model_dir
        self.evaluate_only = evaluate_only
        policy = cfg.runtime.dtype_policy()
        if policy:
            keras.mixed_precision.set_dtype_policy(policy)
        self.strategy = build_strategy(cfg.runtime)
        self.num_replicas = self.strategy.num_replicas_in_sync
        prepare_synthetic_data(cfg, evaluate_only)
        cfg.validate(num_replicas=self.num_replicas, check_files=True, training=not evaluate_only)
        self.chief = is_chief(self.strategy)
        self._eval_source = None
        self._eval_groundtruth = None
        if evaluate_only:
            # The model directory is read, not written: its own config and categories.
            self.train_source = None
            if not os.path.isdir(model_dir):
                raise CheckpointError(f"{model_dir}: no such model directory to evaluate")
            self.category_map = self._evaluated_category_map()
        else:
            os.makedirs(model_dir, exist_ok=True)
            self.train_source = pipeline.source_from_config(cfg.train_data)  # loaded once
            self.category_map = self._category_map()
            if self.chief:
                model_dir_lib.write_model_dir(model_dir, cfg, self.category_map)
        with self.strategy.scope():
            keras.utils.set_random_seed(cfg.train.seed)
            model_cfg = cfg.model
            if (model_cfg.init_checkpoint or evaluate_only) and model_cfg.backbone.weights:
                # A checkpoint overwrites every backbone weight: do not fetch them to replace them.
                logging.info(
                    "model.backbone.weights=%r not loaded: a checkpoint gives every weight",
                    model_cfg.backbone.weights,
                )
                model_cfg = model_cfg.override({"backbone": {"weights": None}})
            try:
                self.model = build_model(
                    model_cfg, category_ids=list(self.category_map.dataset_ids)
                )
            except ValueError as e:  # an inconsistent model config, named by the builder
                raise ConfigError(f"model: {e}") from e
            self.optimizer = build_optimizer(
                cfg.train, cfg.train_data.global_batch_size, mixed_float16=policy == "mixed_float16"
            )
            self.optimizer.build(self.model.trainable_variables)
            self.model.compile(optimizer=self.optimizer, jit_compile=bool(cfg.runtime.jit_compile))
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self._checkpoint_dir(), max_to_keep=cfg.train.max_checkpoints_to_keep
        )
        self.restored_from = self.restore()
        if evaluate_only and self.restored_from is None:
            raise CheckpointError(f"{model_dir}: no checkpoint to evaluate")
        self.init_report = None if evaluate_only else self._initialise_from_checkpoint()
        self.saved_step = None

    # --- set-up ----------------------------------------------------------------------------
    def _evaluated_category_map(self) -> CategoryMap:
        """The model directory's categories (a converted COCO model's on any COCO-format set),
        else the evaluation data's."""
        if os.path.exists(os.path.join(self.model_dir, model_dir_lib.CATEGORY_MAP_FILENAME)):
            return model_dir_lib.read_category_map(self.model_dir)
        return self.eval_source.category_map

    def _category_map(self) -> CategoryMap:
        saved = os.path.join(self.model_dir, model_dir_lib.CATEGORY_MAP_FILENAME)
        data_map = self.train_source.category_map
        if os.path.exists(saved):
            previous = CategoryMap.from_json(saved)
            if previous != data_map:
                raise UserError(
                    f"{saved} holds other categories than the training data "
                    f"({previous.num_classes} vs {data_map.num_classes}): use a new "
                    "--model_dir"
                )
        logging.info("%d categories: %s", data_map.num_classes, ", ".join(data_map.names))
        return data_map

    def _checkpoint_dir(self) -> str:
        if self.chief:
            return self.model_dir
        # Non-chief workers take part in the save (collectives) but write to a scratch folder.
        task_id = self.strategy.cluster_resolver.task_id
        return os.path.join(self.model_dir, f".worker_{task_id}_scratch")

    def restore(self) -> str | None:
        """Restores the newest readable checkpoint of model_dir (an unreadable one is reported
        and the one before tried); returns its path or None. A model-only checkpoint leaves the
        optimizer fresh at step 0."""
        state = tf.train.get_checkpoint_state(self.model_dir)
        candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
        for path in candidates:
            try:
                if not model_dir_lib.restore_model(self.model, path):
                    logging.info(
                        "%s holds the model only (a converted model): the optimizer starts "
                        "fresh at step 0",
                        path,
                    )
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous
                logging.warning(
                    "Checkpoint %s cannot be restored (%s: %s); trying the one before",
                    path, type(e).__name__, str(e).splitlines()[0][:200],
                )  # fmt: skip
                continue
            logging.info("Resumed from %s at step %d", path, self.step)
            return path
        if candidates:
            raise CheckpointError(
                f"none of the checkpoints in {self.model_dir} can be restored "
                f"({len(candidates)} tried); use a new --model_dir"
            )
        logging.info("No checkpoint in %s: starting from step 0", self.model_dir)
        return None

    def _initialise_from_checkpoint(self):
        """``model.init_checkpoint`` into the fresh model of a run at step 0; its report."""
        source = self.cfg.model.init_checkpoint
        if not source:
            return None
        if self.restored_from is not None:
            logging.info(
                "Resumed from %s: model.init_checkpoint %s is ignored (it only initialises a "
                "run that starts from step 0)", self.restored_from, source,
            )  # fmt: skip
            return None
        modules = self.cfg.model.init_checkpoint_modules
        return load_init_checkpoint(self.model, source, modules=modules, config=self.cfg.model)

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def save(self) -> str:
        self.saved_step = self.step
        path = self.manager.save(checkpoint_number=self.step)
        if self.chief:
            logging.info("Saved checkpoint %s", path)
        else:
            tf.io.gfile.rmtree(self._checkpoint_dir())
        return path

    # --- data ----------------------------------------------------------------------------
    def _dataset(
        self, source, data_cfg, training: bool, seed: int | None = None, input_context=None
    ):
        include_masks = training and self.cfg.model.architecture in MASK_ARCHITECTURES
        return pipeline.build_dataset(
            source, data_cfg, training, input_context=input_context, seed=seed,
            include_masks=include_masks,
        )  # fmt: skip

    def train_dataset(self, seed_offset: int = 0):
        """Sharded per replica; a resumed run reshuffles with seed + start step."""
        seed = self.cfg.train.seed + seed_offset
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: self._dataset(self.train_source, self.cfg.train_data, True, seed, ctx)
        )

    @property
    def eval_source(self):
        """eval_data, loaded at the first evaluation and kept."""
        if self._eval_source is None:
            self._eval_source = pipeline.source_from_config(self.cfg.eval_data)
        return self._eval_source

    def eval_dataset(self):
        return self._dataset(self.eval_source, self.cfg.eval_data, training=False)

    @property
    def eval_groundtruth(self):
        """eval_data's ground truth (a mask model's masks too), checked once and kept."""
        if self._eval_groundtruth is None:
            out_dir = os.path.join(self.model_dir, "eval") if self.chief else None
            self._eval_groundtruth = checked_groundtruth(self.eval_source, out_dir)
            if self.cfg.model.architecture in MASK_ARCHITECTURES:
                _ = self._eval_groundtruth.mask_coco
        return self._eval_groundtruth

    # --- training ---------------------------------------------------------------------------
    def train(
        self, total_steps: int | None = None, evaluate_every_steps: int | None = None
    ) -> dict:
        """``model.fit`` until step ``total_steps`` (default train.total_steps), evaluating
        every ``evaluate_every_steps``; returns the last logged losses and a summary."""
        cfg = self.cfg.train
        total_steps = total_steps or cfg.total_steps
        start_step = self.step
        if start_step >= total_steps:
            logging.info("Already at step %d >= %d: nothing to train", start_step, total_steps)
            return {}
        batch = self.cfg.train_data.global_batch_size
        writer = (
            tf.summary.create_file_writer(os.path.join(self.model_dir, "train"))
            if self.chief
            else tf.summary.create_noop_writer()
        )
        nonfinite = cb.NonFiniteLossPolicy(cfg.on_nan, lambda: self.manager.latest_checkpoint)
        progress = cb.ProgressLogger(
            total_steps, batch, self.model.loss_names, writer, cfg.log_every_steps,
            cfg.summary_every_steps,
        )  # fmt: skip
        stop = cb.StopOnSignal(self.save, lambda: self.saved_step)
        callbacks = [
            nonfinite,
            cb.StopAtStep(total_steps),
            progress,
            cb.PeriodicCheckpoint(self.save, cfg.checkpoint_every_steps, total_steps),
        ]
        periodic = None
        if evaluate_every_steps:
            _ = self.eval_groundtruth  # checked before the first step
            periodic = cb.PeriodicEvaluation(self.evaluate, evaluate_every_steps, total_steps)
            callbacks.append(periodic)
        callbacks.append(stop)
        logging.info(
            "Training steps %d -> %d, global batch %d, %d replica(s)",
            start_step, total_steps, batch, self.num_replicas,
        )  # fmt: skip
        self.model.fit(
            self.train_dataset(seed_offset=start_step), epochs=1, callbacks=callbacks,
            shuffle=False, verbose=0,
        )  # fmt: skip
        summary = progress.summary()
        if self.train_source.drops.summary():
            logging.warning(self.train_source.drops.summary())
        failed_evaluations = len(periodic.failures) if periodic else 0
        logging.info(
            "Trained %d steps in %s (%.2f img/s)%s%s%s%s",
            summary["steps"],
            cb.hms(summary["seconds"]),
            summary["images_per_second"],
            f", {nonfinite.skipped} non-finite steps skipped" if nonfinite.skipped else "",
            f", {progress.loss_scale_skipped} batches skipped by the float16 loss scale"
            if progress.loss_scale_skipped
            else "",
            f", {failed_evaluations} periodic evaluation(s) failed (see the log)"
            if failed_evaluations
            else "",
            self._mask_skips_summary(),
        )
        return {
            **progress.last,
            "step": self.step,
            "seconds": summary["seconds"],
            "skipped_steps": nonfinite.skipped,
            "loss_scale_skipped": progress.loss_scale_skipped,
            "stopped_by": stop.signal,
            "dropped_images": self.train_source.drops.count,
            "failed_evaluations": failed_evaluations,
        }

    def _mask_skips_summary(self) -> str:
        """What a mask model's training data lost to the mask checks, for the last log line."""
        source = self.train_source
        if self.cfg.model.architecture not in MASK_ARCHITECTURES or not hasattr(
            source, "with_masks"
        ):
            return ""
        masked = source.with_masks()  # already made for the training data: kept
        skipped = {r: n for r, n in masked.skipped_annotations.items() if r in MASK_REASONS}
        if not skipped and not masked.clipped_polygons:
            return ""
        parts = [f"{r} {n}" for r, n in sorted(skipped.items())]
        if masked.clipped_polygons:
            parts.append(f"polygons clipped {len(masked.clipped_polygons)}")
        line = f"; training data masks: {', '.join(parts)} (ids in the log above)"
        if masked.images_without_masks:
            ids = ", ".join(str(i) for i in masked.images_without_masks[:20])
            line += f"; images left without objects: {ids}"
        return line

    # --- evaluation and export ----------------------------------------------------------------
    def evaluate(self) -> dict:
        """COCO metrics of the current weights on eval_data; writes JSON into model_dir/eval."""
        out_dir = os.path.join(self.model_dir, "eval")
        logging.info("Evaluating step %d", self.step)
        eval_cfg = self.cfg.eval
        metrics = evaluate_detector(
            self.model, self.eval_dataset(), self.eval_source, out_dir if self.chief else None,
            groundtruth=self.eval_groundtruth, step=self.step, max_steps=eval_cfg.steps,
            compute_rpn_recall=eval_cfg.compute_rpn_recall,
            per_category_metrics=eval_cfg.per_category_metrics,
        )  # fmt: skip
        if self.chief:
            images = []
            if eval_cfg.summary_images and self.cfg.model.architecture != "segment_proposals":
                images = summary_images(
                    self.model, self.eval_dataset(), eval_cfg.summary_images,
                    eval_cfg.summary_score_threshold,
                )  # fmt: skip
            with tf.summary.create_file_writer(out_dir).as_default(step=self.step):
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and k != "step":  # not gt_left_out
                        tf.summary.scalar(f"metrics/{k}", v)
                for i, image in enumerate(images):
                    tf.summary.image(f"detections/{i}", image[None])
        logging.info("Eval at step %d: %s", self.step, format_metrics(metrics))
        return metrics

    def export(self, export_dir: str | None = None) -> str:
        from fpn_tf.serving.export import export_saved_model

        export_dir = export_dir or os.path.join(self.model_dir, "saved_model")
        export_saved_model(self.model, export_dir, self.category_map, self.cfg.eval_data.resize)
        logging.info("Exported SavedModel to %s", export_dir)
        return export_dir


def format_metrics(metrics: dict) -> str:
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    keys += ["mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl"]
    keys += ["AR@100", "AR@1000"]
    keys += ["mask_AR@10", "mask_AR@100", "mask_AR@1000"]
    return "  ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)
