import gc
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

# The helpers' asserts report their values as a test's own do.
pytest.register_assert_rewrite("layer_test", "watched")


def pytest_sessionfinish(session, exitstatus):
    # The suite's TensorFlow graphs, functions and Keras objects are still alive when it ends;
    # frozen, they are left out of the cyclic collection Python runs at exit, which would walk
    # all of them (a minute or more after a full run) to free memory the process returns anyway.
    gc.freeze()


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    tf.random.set_seed(0)
    yield


TINY_OVERRIDES = {
    "model.backbone.widths": [8, 16, 16, 32],
    "model.backbone.stem_width": 8,
    "model.fpn.num_channels": 16,
    "model.box_head.fc_dims": 32,
    "model.roi_sampler.batch_size_per_image": 32,
    "model.rpn.pre_nms_top_k_train": 200,
    "model.rpn.post_nms_top_k_train": 100,
    "model.rpn.pre_nms_top_k_test": 100,
    "model.rpn.post_nms_top_k_test": 50,
    "train_data.resize.short_side": 128,
    "train_data.resize.max_long_side": 160,
    "train_data.global_batch_size": 2,
    "train_data.synthetic.num_images": 8,
    "train_data.synthetic.image_size": [96, 160],
    "eval_data.resize.short_side": 128,
    "eval_data.resize.max_long_side": 160,
    "eval_data.global_batch_size": 2,
    "eval_data.synthetic.num_images": 4,
    "eval_data.synthetic.image_size": [96, 160],
    "train.total_steps": 4,
    "train.warmup_steps": 2,
    "train.decay_steps": [100],
    "train.checkpoint_every_steps": 2,
    "train.log_every_steps": 1,
    "train.summary_every_steps": 1,
}


def load_tiny_config(root):
    """The CPU demo config shrunk to seconds: tiny model, 8 synthetic images of ~128 px, written
    under ``root``."""
    from fpn_tf.configs.loader import load_config

    overrides = dict(TINY_OVERRIDES)
    overrides["train_data.synthetic.output_dir"] = str(root / "synthetic")
    overrides["eval_data.synthetic.output_dir"] = str(root / "synthetic")
    return load_config("configs/cpu_demo.yaml", overrides)


_BOX_SECTIONS = ("roi_sampler", "roi_aligner", "box_head", "detection")


def make_roi_heads(num_classes=3, mask=None, classifier_rows=None, name=None, **settings):
    """`RoIHeads` of the default config sections with ``settings`` (field names, each set in
    the box branch's section that has it) and, with ``mask`` (a dict of ``mask_head`` /
    ``mask_roi_aligner`` fields, ``{}`` for the defaults), a mask branch."""
    from fpn_tf.configs.experiment import ModelConfig
    from fpn_tf.modeling.roi_heads import RoIHeads

    model = ModelConfig()
    for key, value in settings.items():
        section = next(s for s in _BOX_SECTIONS if hasattr(getattr(model, s), key))
        setattr(getattr(model, section), key, value)
    for key, value in (mask or {}).items():
        section = "mask_head" if hasattr(model.mask_head, key) else "mask_roi_aligner"
        setattr(getattr(model, section), key, value)
    return RoIHeads(
        num_classes,
        *(getattr(model, s) for s in _BOX_SECTIONS),
        mask_roi_aligner=None if mask is None else model.mask_roi_aligner,
        mask_head=None if mask is None else model.mask_head,
        classifier_rows=classifier_rows,
        **({} if name is None else {"name": name}),
    )


@pytest.fixture
def tiny_config(tmp_path):
    """load_tiny_config in the test's own directory (a test may change it)."""
    return load_tiny_config(tmp_path)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """{steps: model directory}: the tiny config trained once by the Trainer, its directory
    copied after 2 steps (ckpt-2) and after 4 (ckpt-2, ckpt-4). Tests copy one (copy_run)
    before they change it."""
    from fpn_tf.training.trainer import Trainer

    root = tmp_path_factory.mktemp("tiny_runs")
    trainer = Trainer(load_tiny_config(root), str(root / "run"))
    runs = {}
    for steps in (2, 4):
        trainer.train(total_steps=steps)
        runs[steps] = str(root / f"after_{steps}")
        shutil.copytree(root / "run", runs[steps])
    return runs


def copy_run(run, path):
    """A copy of a tiny_runs directory at ``path`` (its checkpoint index names files relative
    to it), for a test to change."""
    shutil.copytree(run, path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(model, SavedModel directory): test_export.py's tiny detector, exported once for every
    file that serves it (test_export.py, test_predict.py). Tests read it; none may change it."""
    from fpn_tf.serving import export_saved_model
    from test_export import CATEGORY_MAP, RESIZE, tiny_model

    model = tiny_model()
    export_dir = str(tmp_path_factory.mktemp("tiny_export") / "fpn" / "1")
    export_saved_model(model, export_dir, CATEGORY_MAP, RESIZE)
    return model, export_dir
