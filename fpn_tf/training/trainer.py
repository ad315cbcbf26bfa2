"""The train / evaluate / export loop of an experiment (library: no flags, everything from config).

A custom loop (not ``model.fit``), measured and chosen because it gives, in one place: a
distributed step under any ``tf.distribute`` strategy, a check of every step's loss for NaN/Inf
*before* a checkpoint can be written, skipping a non-finite update when configured, checkpoints
every N steps with resume of step and optimizer state, SIGINT/SIGTERM handling, and log lines with
the four losses, LR and images/s. The step itself is the same maths as ``FasterRCNN.train_step``
(which ``model.fit`` users get), plus coupled L2 weight decay for SGD.

Checkpoints: ``tf.train.CheckpointManager`` in ``model_dir`` (model + optimizer, whose
``iterations`` is the global step). The manager writes the data files first and the small
``checkpoint`` index last, atomically, so a write killed half way leaves the previous checkpoint
as the latest; the next start resumes from it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from fpn_tf.configs.experiment import ConfigError
from fpn_tf.configs.loader import save_config
from fpn_tf.data import pipeline
from fpn_tf.data.category_map import CategoryMap
from fpn_tf.evaluation.run import evaluate_detector
from fpn_tf.modeling.factory import build_model
from fpn_tf.training.optimizers import (add_l2_to_gradients, build_optimizer,
                                        current_learning_rate)
from fpn_tf.training.strategy import build_strategy, is_chief

CATEGORY_MAP_FILENAME = "category_map.json"
LOSS_NAMES = ("rpn_objectness_loss", "rpn_box_loss", "fast_rcnn_class_loss",
              "fast_rcnn_box_loss", "total_loss")


class CheckpointError(RuntimeError):
    """No checkpoint of model_dir can be restored."""


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or Inf loss (and ``train.on_nan`` is "stop")."""


def prepare_synthetic_data(cfg) -> None:
    """Generates the synthetic splits a config asks for (once) and points the config at them."""
    from fpn_tf.data import synthetic  # numpy + PIL only
    for split, data_cfg in (("train", cfg.train_data), ("val", cfg.eval_data)):
        if data_cfg.source != "synthetic":
            continue
        s = data_cfg.synthetic
        out_dir = s.output_dir or "runs/synthetic_shapes"
        ann = os.path.join(out_dir, "annotations", f"instances_{split}.json")
        first_id = 1 if split == "train" else 10_000_000
        if os.path.exists(ann):
            logging.info("Synthetic %s split already at %s", split, ann)
            paths = {"annotation_file": ann, "image_dir": os.path.join(out_dir, split)}
        else:
            start = time.time()
            logging.info("Generating %d synthetic %s images into %s ...", s.num_images, split,
                         out_dir)
            paths = synthetic.generate_split(
                out_dir, split, s.num_images, seed=s.seed, image_size=tuple(s.image_size),
                max_objects=s.max_objects, first_image_id=first_id)
            logging.info("... done in %.1f s", time.time() - start)
        data_cfg.annotation_file = paths["annotation_file"]
        data_cfg.image_dir = paths["image_dir"]
        data_cfg.source = "coco"


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop saves a checkpoint and returns at the next step."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint after this step, then stopping",
                        self.signal)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Builds strategy, data, model, optimizer and checkpoint from an `ExperimentConfig`.

    Args:
      cfg: the experiment config (validated here against the strategy's replica count).
      model_dir: checkpoints, params.yaml, category_map.json, TensorBoard summaries, metrics.
    """

    def __init__(self, cfg, model_dir: str):
        self.cfg = cfg
        self.model_dir = model_dir
        policy = cfg.runtime.dtype_policy()
        if policy:
            keras.mixed_precision.set_dtype_policy(policy)
        self.strategy = build_strategy(cfg.runtime)
        self.num_replicas = self.strategy.num_replicas_in_sync
        prepare_synthetic_data(cfg)
        cfg.validate(num_replicas=self.num_replicas, check_files=True)
        self.chief = is_chief(self.strategy)
        os.makedirs(model_dir, exist_ok=True)
        self.train_source = pipeline.source_from_config(cfg.train_data)  # loaded once
        self._eval_source = None
        self.category_map = self._category_map()
        if self.chief:
            save_config(cfg, model_dir)
            self.category_map.to_json(os.path.join(model_dir, CATEGORY_MAP_FILENAME))
        with self.strategy.scope():
            try:
                self.model = build_model(cfg.model,
                                         category_ids=list(self.category_map.dataset_ids))
            except ValueError as e:  # an inconsistent model config, named by the builder
                raise ConfigError(f"model: {e}") from e
            self.optimizer = build_optimizer(cfg.train, cfg.train_data.global_batch_size,
                                             mixed_float16=policy == "mixed_float16")
            self.optimizer.build(self.model.trainable_variables)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self._checkpoint_dir(), max_to_keep=cfg.train.max_checkpoints_to_keep)
        self.restored_from = self.restore()
        self._train_fn = None

    # --- set-up ----------------------------------------------------------------------------
    def _category_map(self) -> CategoryMap:
        saved = os.path.join(self.model_dir, CATEGORY_MAP_FILENAME)
        data_map = self.train_source.category_map
        if os.path.exists(saved):
            previous = CategoryMap.from_json(saved)
            if previous != data_map:
                raise ValueError(f"{saved} holds other categories than the training data "
                                 f"({previous.num_classes} vs {data_map.num_classes}): use a new "
                                 "--model_dir")
        logging.info("%d categories: %s", data_map.num_classes, ", ".join(data_map.names))
        return data_map

    def _checkpoint_dir(self) -> str:
        if self.chief:
            return self.model_dir
        # Non-chief workers take part in the save (collectives) but write to a scratch folder.
        task_id = self.strategy.cluster_resolver.task_id
        return os.path.join(self.model_dir, f".worker_{task_id}_scratch")

    def restore(self) -> str | None:
        """Restores the newest readable checkpoint of model_dir, if any; returns its path.

        A checkpoint that cannot be read (its files damaged after it was recorded) is reported
        and the one before it is tried, so a damaged latest checkpoint never blocks a restart.
        """
        state = tf.train.get_checkpoint_state(self.model_dir)
        candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
        for path in candidates:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous
                logging.warning("Checkpoint %s cannot be restored (%s: %s); trying the one before",
                                path, type(e).__name__, str(e).splitlines()[0][:200])
                continue
            logging.info("Resumed from %s at step %d", path, self.step)
            return path
        if candidates:
            raise CheckpointError(f"none of the checkpoints in {self.model_dir} can be restored "
                             f"({len(candidates)} tried); use a new --model_dir")
        logging.info("No checkpoint in %s: starting from step 0", self.model_dir)
        return None

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def save(self) -> str:
        path = self.manager.save(checkpoint_number=self.step)
        if not self.chief:
            tf.io.gfile.rmtree(self._checkpoint_dir())
            return path
        logging.info("Saved checkpoint %s", path)
        return path

    # --- data ----------------------------------------------------------------------------
    def _dataset(self, source, data_cfg, training: bool, seed: int | None = None,
                 input_context=None):
        return pipeline.build_dataset_from_config(
            source, data_cfg, training, input_context=input_context, seed=seed)

    def train_dataset(self, seed_offset: int = 0):
        """Sharded per replica; a resumed run reshuffles with seed + start step."""
        seed = self.cfg.train.seed + seed_offset
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: self._dataset(self.train_source, self.cfg.train_data, True, seed, ctx))

    @property
    def eval_source(self):
        """eval_data, loaded at the first evaluation and kept."""
        if self._eval_source is None:
            self._eval_source = pipeline.source_from_config(self.cfg.eval_data)
        return self._eval_source

    def eval_dataset(self):
        return self._dataset(self.eval_source, self.cfg.eval_data, training=False)

    # --- the step ----------------------------------------------------------------------------
    def _build_train_fn(self):
        model, optimizer, train_cfg = self.model, self.optimizer, self.cfg.train
        replicas = float(self.num_replicas)
        skip_nonfinite = train_cfg.on_nan == "skip"

        def step_fn(features, labels):
            with tf.GradientTape() as tape:
                losses = model.compute_losses(features, labels, training=True)
                loss = optimizer.scale_loss(losses["total_loss"] / replicas)
            variables = model.trainable_variables
            grads = tape.gradient(loss, variables)
            grads = add_l2_to_gradients(grads, variables, train_cfg)
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in losses.values()])
            if skip_nonfinite:
                def apply_update():
                    optimizer.apply(grads, variables)
                    return tf.constant(True)

                tf.cond(finite, apply_update, lambda: tf.constant(False))
            else:
                # "stop": the update is applied but the loop stops before anything is saved.
                optimizer.apply(grads, variables)
            return losses, 1.0 - tf.cast(finite, tf.float32)

        def train_fn(features, labels):
            losses, nonfinite = self.strategy.run(step_fn, args=(features, labels))
            mean = {k: self.strategy.reduce("MEAN", v, axis=None) for k, v in losses.items()}
            num_nonfinite = self.strategy.reduce("SUM", nonfinite, axis=None)
            return mean, num_nonfinite

        return tf.function(train_fn, jit_compile=self.cfg.runtime.jit_compile or None)

    def train(self, total_steps: int | None = None) -> dict:
        """Trains until ``total_steps`` (default train.total_steps); returns the last log."""
        cfg = self.cfg.train
        total_steps = total_steps or cfg.total_steps
        start_step = self.step
        if start_step >= total_steps:
            logging.info("Already at step %d >= %d: nothing to train", start_step, total_steps)
            return {}
        if self._train_fn is None:
            self._train_fn = self._build_train_fn()
        batch = self.cfg.train_data.global_batch_size
        iterator = iter(self.train_dataset(seed_offset=start_step))
        writer = (tf.summary.create_file_writer(os.path.join(self.model_dir, "train"))
                  if self.chief else tf.summary.create_noop_writer())
        logging.info("Training steps %d -> %d, global batch %d, %d replica(s)", start_step,
                     total_steps, batch, self.num_replicas)
        window = {k: [] for k in LOSS_NAMES}
        window_start, run_start, skipped, last = time.time(), time.time(), 0, {}
        prev_step, scale_skipped = start_step, 0
        last_saved = self.manager.latest_checkpoint
        with _StopFlag() as stop:
            while self.step < total_steps:
                features, labels = next(iterator)
                losses, num_nonfinite = self._train_fn(features, labels)
                step = self.step
                values = {k: float(v) for k, v in losses.items()}
                if float(num_nonfinite) > 0:
                    bad = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                    if cfg.on_nan == "skip":
                        skipped += 1
                        logging.warning("Step %d: non-finite loss (%s): update skipped (%d so far)",
                                        step, bad, skipped)
                        continue
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} ({bad}); nothing was saved for it. "
                        f"Last good checkpoint: {last_saved or 'none'}. Lower train.learning_rate, "
                        "or set train.on_nan=skip to skip such steps")
                for k in LOSS_NAMES:
                    window[k].append(values[k])
                if step == prev_step:
                    # mixed_float16: the loss scale overflowed, so LossScaleOptimizer skipped
                    # the update (and lowered the scale): the step counter did not move.
                    scale_skipped += 1
                else:
                    prev_step = step
                    if step % cfg.summary_every_steps == 0 or step == total_steps:
                        with writer.as_default(step=step):
                            for k, v in values.items():
                                tf.summary.scalar(f"losses/{k}", v)
                            tf.summary.scalar("learning_rate",
                                              current_learning_rate(self.optimizer))
                    if step % cfg.log_every_steps == 0 or step == total_steps:
                        elapsed = time.time() - window_start
                        rate = len(window["total_loss"]) * batch / max(elapsed, 1e-9)
                        last = {k: float(np.mean(v)) for k, v in window.items()}
                        eta = (total_steps - step) * batch / max(rate, 1e-9)
                        logging.info(
                            "step %d/%d  loss %.4f (rpn obj %.4f box %.4f | frcnn cls %.4f "
                            "box %.4f)  lr %.3g  %.2f img/s  eta %s", step, total_steps,
                            last["total_loss"], last["rpn_objectness_loss"], last["rpn_box_loss"],
                            last["fast_rcnn_class_loss"], last["fast_rcnn_box_loss"],
                            current_learning_rate(self.optimizer), rate, _hms(eta))
                        with writer.as_default(step=step):
                            tf.summary.scalar("images_per_second", rate)
                        window = {k: [] for k in LOSS_NAMES}
                        window_start = time.time()
                    if step % cfg.checkpoint_every_steps == 0 or step == total_steps:
                        last_saved = self.save()
                if stop.signal:
                    if self.manager.latest_checkpoint != os.path.join(
                            self.model_dir, f"ckpt-{step}"):
                        last_saved = self.save()
                    logging.warning("Stopped by %s at step %d; resume with the same --model_dir",
                                    stop.signal, step)
                    break
        writer.flush()
        seconds = time.time() - run_start
        if self.train_source.drops.summary():
            logging.warning(self.train_source.drops.summary())
        logging.info("Trained %d steps in %s (%.2f img/s)%s%s", self.step - start_step,
                     _hms(seconds), (self.step - start_step) * batch / max(seconds, 1e-9),
                     f", {skipped} non-finite steps skipped" if skipped else "",
                     f", {scale_skipped} batches skipped by the float16 loss scale"
                     if scale_skipped else "")
        return {**last, "step": self.step, "seconds": seconds, "skipped_steps": skipped,
                "loss_scale_skipped": scale_skipped, "stopped_by": stop.signal}

    # --- evaluation and export ----------------------------------------------------------------
    def evaluate(self) -> dict:
        """COCO metrics of the current weights on eval_data; writes JSON into model_dir/eval."""
        out_dir = os.path.join(self.model_dir, "eval")
        logging.info("Evaluating step %d", self.step)
        metrics = evaluate_detector(
            self.model, self.eval_dataset(), self.eval_source, out_dir if self.chief else None,
            step=self.step, max_steps=self.cfg.eval.steps,
            compute_rpn_recall=self.cfg.eval.compute_rpn_recall,
            per_category_metrics=self.cfg.eval.per_category_metrics)
        if self.chief:
            with tf.summary.create_file_writer(out_dir).as_default(step=self.step):
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and k != "step":
                        tf.summary.scalar(f"metrics/{k}", v)
        logging.info("Eval at step %d: %s", self.step, format_metrics(metrics))
        return metrics

    def export(self, export_dir: str | None = None) -> str:
        from fpn_tf.serving.export import export_saved_model
        export_dir = export_dir or os.path.join(self.model_dir, "saved_model")
        data_cfg = self.cfg.eval_data
        export_saved_model(self.model, export_dir, self.category_map,
                           short_side=data_cfg.short_side, max_long_side=data_cfg.max_long_side,
                           pad_multiple=data_cfg.pad_multiple)
        logging.info("Exported SavedModel to %s", export_dir)
        return export_dir


def format_metrics(metrics: dict) -> str:
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100", "AR@1000"]
    return "  ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
