"""`MultiLossModel`: a `keras.Model` trained on a dict of losses, the package's one objective.

``total_loss`` / replicas (tf.distribute sums gradients), loss-scaled under float16; weight decay
is the optimizer's. A step whose losses are non-finite on any replica updates nothing anywhere
and logs ``num_nonfinite_replicas``. A step's logs are its own losses, not running means.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

NONFINITE_KEY = "num_nonfinite_replicas"


class MultiLossModel(keras.Model):
    """Subclasses implement ``compute_losses``, whose keys are ``loss_names`` (with the minimised
    ``"total_loss"``)."""

    def __init__(self, loss_names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        if "total_loss" not in loss_names:
            raise ValueError(f"loss_names must include 'total_loss', got {list(loss_names)}")
        self.loss_names = tuple(loss_names)
        self._loss_trackers = {n: keras.metrics.Mean(name=n) for n in self.loss_names}

    def compile(self, *args, jit_compile=False, **kwargs):
        """`keras.Model.compile` with XLA off unless asked for (Keras' "auto" turns it on for
        GPUs, where it slows this detector's step down)."""
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def compute_losses(self, features, labels, training=True):
        raise NotImplementedError

    def train_step(self, data):
        features, labels = data[0], data[1]
        replica_context = tf.distribute.get_replica_context()
        num_replicas = replica_context.num_replicas_in_sync if replica_context else 1
        with tf.GradientTape() as tape:
            losses = self.compute_losses(features, labels, training=True)
            loss = losses["total_loss"] / float(num_replicas)
            loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in losses.values()])
        nonfinite = 1.0 - tf.cast(finite, tf.float32)
        if replica_context is not None and num_replicas > 1:
            nonfinite = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, nonfinite)

        self._apply_unless(nonfinite > 0, grads, variables)
        for name, tracker in self._loss_trackers.items():
            tracker.update_state(losses[name])
        # Shape [1], not scalars: under MultiWorkerMirroredStrategy Keras reduces step outputs
        # with strategy.reduce(MEAN, axis=0), which rejects scalars.
        return {k: tf.reshape(v, [1]) for k, v in {**losses, NONFINITE_KEY: nonfinite}.items()}

    def _apply_unless(self, skip, grads, variables):
        """``optimizer.apply`` unless ``skip``, branching in the cross-replica context (as
        `LossScaleOptimizer` does): the optimizer's merge_call is not allowed inside a
        replica-context cond."""

        def cross_replica(strategy, skip, grads):
            skip = strategy.experimental_local_results(skip)[0]

            def apply():
                strategy.extended.call_for_each_replica(
                    lambda g: self.optimizer.apply(g, variables), args=(grads,)
                )

            tf.cond(skip, lambda: None, apply)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(skip, grads))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' private hook, kept (WORKSPACE.md, Decisions): under a strategy Keras builds the
        # model from a batch of a fresh iterator of the training data before training from
        # another one, so a seeded stream that reshuffles per iterator would train on another
        # first batch than without a strategy. Built layers only need the optimizer built.
        if not all(layer.built for layer in self.layers):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def test_step(self, data):
        features, labels = data[0], data[1]
        losses = self.compute_losses(features, labels, training=False)
        for name, tracker in self._loss_trackers.items():
            tracker.update_state(losses[name])
        return {name: tracker.result() for name, tracker in self._loss_trackers.items()}

    @property
    def metrics(self):
        return list(self._loss_trackers.values())
