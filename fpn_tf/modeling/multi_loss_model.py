"""The one training step of fpn_tf: a `keras.Model` trained on a dict of losses.

`MultiLossModel.train_step` is what both ``model.fit`` and ``python -m fpn_tf.train`` (which
runs ``fit``) execute, so the objective is defined once:

- the loss is ``compute_losses(...)["total_loss"]``, divided by the number of replicas because
  ``tf.distribute`` sums the replicas' gradients (each replica's loss is the mean over its own
  images with a constant normaliser, so the sum is the global-batch mean), then multiplied by the
  loss scale of a `LossScaleOptimizer` (float16);
- weight decay is the optimizer's (`fpn_tf.training.optimizers`): applied once per step to the
  summed, unscaled gradient, never per replica;
- a step whose loss is NaN/Inf on any replica applies no update on any replica (the replicas
  agree through an all-reduce, so they take the same branch), and reports it as
  ``num_nonfinite_replicas`` in the step's logs; what to do next (stop, or go on) is the caller's
  policy (`fpn_tf.training.callbacks`).

The logs of a step are that step's losses (averaged over replicas by Keras; shape [1]), not
running means, so callbacks can log, summarise and check each step.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

NONFINITE_KEY = "num_nonfinite_replicas"


class MultiLossModel(keras.Model):
    """Base class: subclasses implement ``compute_losses(features, labels, training)``.

    Args:
      loss_names: the keys ``compute_losses`` returns, ``"total_loss"`` among them (the one
        that is minimised); each gets a `keras.metrics.Mean` for ``evaluate``.
    """

    def __init__(self, loss_names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        if "total_loss" not in loss_names:
            raise ValueError(f"loss_names must include 'total_loss', got {list(loss_names)}")
        self.loss_names = tuple(loss_names)
        self._loss_trackers = {n: keras.metrics.Mean(name=n) for n in self.loss_names}

    def compile(self, *args, jit_compile=False, **kwargs):
        """`keras.Model.compile`, but XLA off unless asked for: Keras' "auto" turns it on for
        GPUs, where it made this detector's training step several times slower."""
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def compute_losses(self, features, labels, training=True):
        """A dict of scalar float32 losses with ``total_loss``; implemented by subclasses."""
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

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras, under a tf.distribute strategy, pulls a batch from a fresh iterator of the
        training data to build the model symbolically, then trains from another fresh iterator:
        a seeded stream that reshuffles per iteration then trains on a different first batch
        than the same data gives without a strategy. A model whose layers are all built and that
        compiles no loss or metrics only needs its optimizer built: do that without data."""
        layers_built = all(layer.built for layer in self._flatten_layers(include_self=False))
        if (
            not layers_built
            or getattr(self, "_compile_loss", None) is not None
            or getattr(self, "_compile_metrics", None) is not None
        ):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def _apply_unless(self, skip, grads, variables):
        """``optimizer.apply`` unless ``skip`` (the same value on every replica)."""

        def apply():
            self.optimizer.apply(grads, variables)

        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            tf.cond(skip, lambda: None, apply)
            return

        # The optimizer synchronises the replicas through merge_call, which TensorFlow does not
        # allow inside a replica-context cond: take the branch in the cross-replica context
        # (as LossScaleOptimizer does), then apply on every replica.
        def cross_replica(distribution, skip, grads):
            skip = distribution.experimental_local_results(skip)[0]

            def apply_everywhere():
                distribution.extended.call_for_each_replica(
                    lambda g: self.optimizer.apply(g, variables), args=(grads,)
                )

            tf.cond(skip, lambda: None, apply_everywhere)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(skip, grads))

    def test_step(self, data):
        features, labels = data[0], data[1]
        losses = self.compute_losses(features, labels, training=False)
        for name, tracker in self._loss_trackers.items():
            tracker.update_state(losses[name])
        return {name: tracker.result() for name, tracker in self._loss_trackers.items()}

    @property
    def metrics(self):
        return list(self._loss_trackers.values())
