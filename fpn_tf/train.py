"""``python -m fpn_tf.train``: train, evaluate and export FPN Faster R-CNN.

With no arguments, the CPU demo (synthetic shapes, small backbone). Without ``--config_file`` a
``--model_dir`` holding a ``params.yaml`` runs with that config. ``--mode=eval`` reads the model
directory and writes only into ``<model_dir>/eval``.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

from fpn_tf import cli
from fpn_tf.errors import UserError, parse_flags

DEMO_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cpu_demo.yaml"
)

FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
    "config_file", None,
    "YAML experiment file(s), applied in order over the defaults (default: configs/cpu_demo.yaml).",
)  # fmt: skip
flags.DEFINE_string(
    "params_override", None,
    "Dotted key=value list or YAML/JSON mapping applied last, "
    "e.g. 'train.total_steps=100,train_data.global_batch_size=2'.",
)  # fmt: skip
flags.DEFINE_string(
    "model_dir", None,
    "Checkpoints, params.yaml, summaries, metrics and the SavedModel "
    "(default: runs/cpu_demo for the demo). A run resumes from its last checkpoint.",
)  # fmt: skip
flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"], "What to run.")
# Flags that override one config key each (None = the config's).
_OVERRIDES = {
    "strategy": "runtime.strategy",
    "devices": "runtime.devices",
    "num_logical_cpu_devices": "runtime.num_logical_cpu_devices",
    "mixed_precision": "runtime.mixed_precision",
    "jit_compile": "runtime.jit_compile",
    "total_steps": "train.total_steps",
}
flags.DEFINE_enum(
    "strategy", None, ["one_device", "mirrored", "multi_worker_mirrored"],
    "Overrides runtime.strategy.",
)  # fmt: skip
flags.DEFINE_list("devices", None, "Overrides runtime.devices, e.g. /gpu:0,/gpu:1.")
flags.DEFINE_integer(
    "num_logical_cpu_devices", None, "Split the CPU into N logical devices (mirrored without GPUs)."
)
flags.DEFINE_enum(
    "mixed_precision",
    None,
    ["float32", "float16", "bfloat16"],
    "Overrides runtime.mixed_precision.",
)
flags.DEFINE_boolean("jit_compile", None, "Overrides runtime.jit_compile (XLA).")
flags.DEFINE_integer("total_steps", None, "Overrides train.total_steps.")
flags.DEFINE_boolean("export", True, "Export a SavedModel to MODEL_DIR/saved_model at the end.")


def _overrides() -> dict:
    values = {key: FLAGS[name].value for name, key in _OVERRIDES.items()}
    return {key: v for key, v in values.items() if v is not None and v != []}


def run(config_files, params_override, model_dir, mode, export=True, extra_overrides=None):
    """Runs an experiment; returns ``{"metrics": ..., "saved_model": ..., ...}``."""
    from fpn_tf.configs.loader import load_config  # no TensorFlow yet

    overrides = [o for o in (params_override, extra_overrides) if o]
    cfg = load_config(config_files, overrides or None)
    cli.configure_tensorflow_environment(cfg.runtime.strategy)
    from fpn_tf.training.trainer import Trainer, format_metrics

    start = time.time()
    trainer = Trainer(cfg, model_dir, evaluate_only=mode == "eval")
    result = {"model_dir": os.path.abspath(model_dir)}
    if mode in ("train", "train_and_eval"):
        every = cfg.eval.every_steps if mode == "train_and_eval" else None
        result["train"] = trainer.train(evaluate_every_steps=every)
        if result["train"].get("stopped_by"):
            return result
    if mode in ("eval", "train_and_eval"):
        result["metrics"] = trainer.evaluate()
    if export and trainer.chief and mode != "eval":
        if cfg.model.architecture == "segment_proposals":
            # The serving contract is detections (the TF Object Detection API's outputs).
            logging.info("model.architecture segment_proposals: no SavedModel is exported")
        else:
            result["saved_model"] = os.path.abspath(trainer.export())
    result["seconds"] = round(time.time() - start, 1)
    out = result["model_dir"]
    lines = [
        f"Done in {result['seconds']:.0f} s.",
        f"  model_dir:   {out}",
        f"  config:      {os.path.join(out, 'params.yaml')}",
        f"  checkpoint:  {trainer.manager.latest_checkpoint}",
    ]
    if "metrics" in result:
        lines.append(f"  metrics:     {os.path.join(out, 'eval', 'metrics.json')}")
        lines.append(f"               {format_metrics(result['metrics'])}")
    if "saved_model" in result:
        lines.append(f"  saved_model: {result['saved_model']}")
    lines.append(f"  tensorboard: tensorboard --logdir {result['model_dir']}")
    print("\n".join(lines), flush=True)
    return result


def default_config_files(model_dir: str) -> list[str]:
    """Without --config_file: the model directory's own config, else the demo's."""
    params = os.path.join(model_dir, "params.yaml")
    return [params] if os.path.isfile(params) else [DEMO_CONFIG]


def main(argv):
    cli.run_main(argv, _main)


def _main():
    model_dir = FLAGS.model_dir or ("runs/cpu_demo" if not FLAGS.config_file else None)
    if not model_dir:
        raise UserError("--model_dir is required with --config_file")
    config_files = FLAGS.config_file or default_config_files(model_dir)
    logging.info("Config: %s", ", ".join(config_files))
    run(config_files, FLAGS.params_override, model_dir, FLAGS.mode, FLAGS.export, _overrides())


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
