"""One worker of a 2-worker MultiWorkerMirroredStrategy run on loopback (TF_CONFIG set by the
caller). Trains a few steps of the tiny config and writes its final weights to OUT/worker_ID.npz.

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:P0", "127.0.0.1:P1"]},
                "task": {"type": "worker", "index": I}}' \\
        python tests/scripts/multiworker_worker.py DATA_DIR MODEL_DIR OUT STEPS
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, "tests")
from conftest import TINY_OVERRIDES  # noqa: E402
from fpn_tf.configs.loader import load_config  # noqa: E402
from fpn_tf.training.trainer import Trainer  # noqa: E402


def main(data_dir, model_dir, out_dir, steps):
    overrides = dict(TINY_OVERRIDES)
    overrides.update(
        {
            "train_data.synthetic.output_dir": data_dir,
            "eval_data.synthetic.output_dir": data_dir,
            "train_data.global_batch_size": 2,
            "eval_data.global_batch_size": 2,
            "runtime.strategy": "multi_worker_mirrored",
            "train.checkpoint_every_steps": 2,
            # BatchNorm trains in the small backbone: statistics over the global batch keep the
            # workers' moving averages identical (unsynchronised, each worker keeps its own).
            "model.backbone.sync_batch_norm": True,
        }
    )
    cfg = load_config("configs/cpu_demo.yaml", overrides)
    trainer = Trainer(cfg, model_dir)
    start = trainer.step
    trainer.train(total_steps=int(steps))
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    np.savez(os.path.join(out_dir, f"worker_{task}.npz"), *[w for w in trainer.model.get_weights()])
    with open(os.path.join(out_dir, f"worker_{task}.json"), "w") as f:
        json.dump(
            {
                "start_step": start,
                "end_step": trainer.step,
                "chief": trainer.chief,
                "replicas": trainer.num_replicas,
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:5])
    sys.stdout.flush()
    os._exit(0)
