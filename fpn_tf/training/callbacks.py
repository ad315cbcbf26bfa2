"""The training command's policies as Keras callbacks around ``model.fit``.

The step is the optimizer's ``iterations`` (restored with a checkpoint), not Keras' batch
counter: a batch skipped by the float16 loss scale or ``train.on_nan=skip`` is no step to log,
save or count. Keras' `TerminateOnNaN`, `TensorBoard` and `BackupAndRestore` do not do these
jobs (WORKSPACE.md, Decisions).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from fpn_tf.errors import UserError
from fpn_tf.modeling.multi_loss_model import NONFINITE_KEY
from fpn_tf.training.optimizers import current_learning_rate

# With on_nan "skip", this many non-finite batches in a row mean the weights themselves are
# broken (every later step would be skipped too): stop instead of spinning.
MAX_CONSECUTIVE_NONFINITE = 100


class NonFiniteLossError(UserError, RuntimeError):
    """A training step produced a NaN or Inf loss (and ``train.on_nan`` is "stop")."""


def value(log_entry) -> float:
    """A step log's value (shape [1]) as a float."""
    return float(np.mean(log_entry))


def _step(model) -> int:
    return int(model.optimizer.iterations.numpy())


def _every(step: int, every: int, total_steps: int) -> bool:
    return step % every == 0 or step == total_steps


class StepWatcher(keras.callbacks.Callback):
    """Base: ``on_step(step, logs)`` after each batch that moved the global step,
    ``on_skipped_batch(step, logs)`` after the others."""

    def on_train_begin(self, logs=None):
        self._last_step = _step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = _step(self.model)
        if step != self._last_step:
            self._last_step = step
            self.on_step(step, {k: value(v) for k, v in (logs or {}).items()})
        else:
            self.on_skipped_batch(step, logs)

    def on_step(self, step: int, logs: dict):
        pass

    def on_skipped_batch(self, step: int, logs):
        pass


class StopAtStep(StepWatcher):
    """Ends ``fit`` at global step ``total_steps`` (the data stream is endless)."""

    def __init__(self, total_steps: int):
        super().__init__()
        self.total_steps = int(total_steps)

    def on_step(self, step, logs):
        if step >= self.total_steps:
            self.model.stop_training = True


class NonFiniteLossPolicy(keras.callbacks.Callback):
    """``train.on_nan``: "stop" raises `NonFiniteLossError` before the step is saved; "skip"
    counts the skipped step and goes on."""

    def __init__(self, policy: str, last_checkpoint: Callable[[], str | None]):
        super().__init__()
        if policy not in ("stop", "skip"):
            raise ValueError(f"on_nan must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.last_checkpoint = last_checkpoint
        self.skipped = 0
        self._consecutive = 0

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if value(logs.get(NONFINITE_KEY, 0.0)) == 0:
            self._consecutive = 0
            return
        step = _step(self.model) + 1  # the step this batch would have made
        bad = ", ".join(f"{k}={value(v):.4g}" for k, v in logs.items() if k != NONFINITE_KEY)
        self._consecutive += 1
        if self.policy == "skip" and self._consecutive < MAX_CONSECUTIVE_NONFINITE:
            self.skipped += 1
            logging.warning(
                "Step %d: non-finite loss (%s): update skipped (%d so far)", step, bad, self.skipped
            )
            return
        why = (
            f"{self._consecutive} non-finite batches in a row"
            if self.policy == "skip"
            else "train.on_nan=stop"
        )
        raise NonFiniteLossError(
            f"non-finite loss at step {step} ({bad}; {why}); nothing was saved for it. Last good "
            f"checkpoint: {self.last_checkpoint() or 'none'}. Lower train.learning_rate, or set "
            "train.on_nan=skip to skip such steps"
        )


class ProgressLogger(StepWatcher):
    """A log line every ``log_every_steps`` (losses averaged since the last line, LR, images/s,
    ETA); the step's losses and LR in TensorBoard every ``summary_every_steps``."""

    def __init__(
        self,
        total_steps,
        global_batch_size,
        loss_names,
        writer,
        log_every_steps,
        summary_every_steps,
    ):
        super().__init__()
        self.total_steps = int(total_steps)
        self.global_batch_size = int(global_batch_size)
        self.loss_names = tuple(loss_names)
        self.writer = writer
        self.log_every_steps = int(log_every_steps)
        self.summary_every_steps = int(summary_every_steps)
        self.loss_scale_skipped = 0
        self.last = {}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.start_step = self._last_step
        self._run_start = self._window_start = time.time()
        self._window, self._window_batches = {k: [] for k in self.loss_names}, 0

    def on_train_batch_end(self, batch, logs=None):
        self._window_batches += 1
        super().on_train_batch_end(batch, logs)

    def on_skipped_batch(self, step, logs):
        if value((logs or {}).get(NONFINITE_KEY, 0.0)) == 0:
            self.loss_scale_skipped += 1  # mixed_float16: LossScaleOptimizer skipped it

    def on_step(self, step, logs):
        lr = current_learning_rate(self.model.optimizer)
        if _every(step, self.summary_every_steps, self.total_steps):
            with self.writer.as_default(step=step):
                for k, v in logs.items():
                    if k != NONFINITE_KEY:
                        tf.summary.scalar(f"losses/{k}", v)
                tf.summary.scalar("learning_rate", lr)
        for k in self.loss_names:
            self._window[k].append(logs[k])
        if not _every(step, self.log_every_steps, self.total_steps):
            return
        elapsed = time.time() - self._window_start
        rate = self._window_batches * self.global_batch_size / max(elapsed, 1e-9)
        self.last = {k: float(np.mean(v)) for k, v in self._window.items()}
        eta = (self.total_steps - step) * self.global_batch_size / max(rate, 1e-9)
        losses = "  ".join(
            f"{_short(k)} {self.last[k]:.4f}" for k in self.loss_names if k != "total_loss"
        )
        logging.info(
            "step %d/%d  loss %.4f (%s)  lr %.3g  %.2f img/s  eta %s",
            step, self.total_steps, self.last["total_loss"], losses, lr, rate, hms(eta),
        )  # fmt: skip
        with self.writer.as_default(step=step):
            tf.summary.scalar("images_per_second", rate)
        self._window, self._window_batches = {k: [] for k in self.loss_names}, 0
        self._window_start = time.time()

    def on_train_end(self, logs=None):
        self.writer.flush()

    def summary(self) -> dict:
        seconds = time.time() - self._run_start
        steps = _step(self.model) - self.start_step
        return {
            "steps": steps,
            "seconds": seconds,
            "images_per_second": steps * self.global_batch_size / max(seconds, 1e-9),
            "loss_scale_skipped": self.loss_scale_skipped,
        }


def _short(loss_name: str) -> str:
    return (
        loss_name.replace("_loss", "")
        .replace("fast_rcnn_", "frcnn ")
        .replace("rpn_", "rpn ")
        .replace("objectness", "obj")
        .replace("class", "cls")
    )


class PeriodicCheckpoint(StepWatcher):
    """``save()`` every ``every_steps`` and at ``total_steps``."""

    def __init__(self, save: Callable[[], str], every_steps: int, total_steps: int):
        super().__init__()
        self.save = save
        self.every_steps = int(every_steps)
        self.total_steps = int(total_steps)

    def on_step(self, step, logs):
        if _every(step, self.every_steps, self.total_steps):
            self.save()


class StopOnSignal(keras.callbacks.Callback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, end ``fit``."""

    def __init__(self, save: Callable[[], str], saved_step: Callable[[], int | None]):
        super().__init__()
        self.save = save
        self.saved_step = saved_step
        self.signal = None
        self._previous = {}

    def on_train_begin(self, logs=None):
        self.signal = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.signal = signal.Signals(signum).name
        logging.warning(
            "%s received: saving a checkpoint after this step, then stopping", self.signal
        )

    def on_train_batch_end(self, batch, logs=None):
        if not self.signal:
            return
        step = _step(self.model)
        if self.saved_step() != step:
            self.save()
        logging.warning(
            "Stopped by %s at step %d; resume with the same --model_dir", self.signal, step
        )
        self.model.stop_training = True

    def on_train_end(self, logs=None):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class PeriodicEvaluation(StepWatcher):
    """``evaluate()`` every ``every_steps`` before ``total_steps``. A failure is logged, counted
    in ``failures`` and training goes on, except for ``stop_on`` (a user's mistake)."""

    def __init__(self, evaluate, every_steps: int, total_steps: int, stop_on=(UserError,)):
        super().__init__()
        self.evaluate = evaluate
        self.every_steps = int(every_steps)
        self.total_steps = int(total_steps)
        self.stop_on = tuple(stop_on)
        self.failures: list[tuple[int, str]] = []  # (step, one-line error)

    def on_step(self, step, logs):
        if step % self.every_steps or step >= self.total_steps:
            return
        try:
            self.evaluate()
        except self.stop_on:
            raise
        except Exception as e:  # noqa: BLE001 - any failure: one line, training goes on
            first = (str(e).strip().splitlines() or [""])[0][:300]
            message = f"{type(e).__name__}: {first}" if first else type(e).__name__
            self.failures.append((step, message))
            logging.error(
                "Evaluation at step %d failed (%s); training goes on (%d failed so far)",
                step, message, len(self.failures),
            )  # fmt: skip
            logging.vlog(1, "The failed evaluation's traceback:", exc_info=True)


def hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
