"""Every ablation config builds the architecture its row names: pyramid outputs and anchors."""

import tensorflow as tf

from fpn_tf.ablations import ROWS, markdown_table
from fpn_tf.configs.loader import load_config
from fpn_tf.modeling.factory import build_model
from fpn_tf.modeling.fpn import FeaturePyramid

CATEGORY_IDS = [1, 3, 7, 9]


def _model(row):
    cfg = load_config(f"configs/ablations/{row}.yaml")
    return cfg, build_model(cfg.model, CATEGORY_IDS)


def _pyramid(model):
    layers = [l for l in model.fpn.layers if isinstance(l, FeaturePyramid)]
    return layers[0] if layers else None


def _outputs(model, size=(320, 480)):
    return model.fpn(tf.zeros((1, *size, 3)))


def test_rows_share_everything_but_the_pyramid():
    cfgs = {row: load_config(f"configs/ablations/{row}.yaml").to_dict() for row in ROWS}
    reference = cfgs["e_fpn"]
    for row, cfg in cfgs.items():
        for section in ("train_data", "eval_data", "train", "eval", "runtime"):
            assert cfg[section] == reference[section], (row, section)
        for section in (
            "backbone",
            "anchor",
            "rpn",
            "roi_sampler",
            "roi_aligner",
            "box_head",
            "detection",
        ):
            assert cfg["model"][section] == reference["model"][section], (row, section)


def test_single_scale_c4_row():
    _, model = _model("a_single_scale_c4")
    assert _pyramid(model) is None
    out = _outputs(model)
    assert list(out) == ["P4"] and out["P4"].shape == (1, 20, 30, 128)  # C4: stride 16
    assert model.rpn.anchor_sizes == {"P4": (16.0, 32.0, 64.0, 128.0, 256.0)}
    assert model.rpn.num_anchors == 15 and model.roi_heads.box_pooler.levels == ["P4"]


def test_bottom_up_row():
    _, model = _model("b_bottom_up")
    fp = _pyramid(model)
    assert not fp.use_top_down and fp.use_lateral
    assert sorted(_outputs(model)) == ["P2", "P3", "P4", "P5", "P6"]
    assert model.rpn.num_anchors == 3


def test_no_lateral_row():
    _, model = _model("c_no_lateral")
    fp = _pyramid(model)
    assert fp.use_top_down and not fp.use_lateral
    assert sorted(fp.lateral_convs) == [5]
    assert model.rpn.num_anchors == 3 and len(model.rpn.levels) == 5


def test_p2_only_row():
    _, model = _model("d_p2_only")
    out = _outputs(model)
    assert list(out) == ["P2"] and out["P2"].shape == (1, 80, 120, 128)
    assert model.rpn.anchor_sizes == {"P2": (16.0, 32.0, 64.0, 128.0, 256.0)}
    assert model.rpn.num_anchors == 15 and model.roi_heads.box_pooler.levels == ["P2"]


def test_fpn_row():
    _, model = _model("e_fpn")
    out = _outputs(model)
    assert [out[k].shape[1] for k in ("P2", "P3", "P4", "P5", "P6")] == [80, 40, 20, 10, 5]
    assert model.rpn.anchor_sizes == {
        f"P{l}": (s,) for l, s in zip(range(2, 7), (16.0, 32.0, 64.0, 128.0, 256.0))
    }
    assert model.roi_heads.box_pooler.levels == ["P2", "P3", "P4", "P5"]


def test_markdown_table_has_a_line_per_row():
    table = markdown_table([{"name": "(e) FPN", "AP": 0.5, "AP50": 0.75, "sec_per_step": 1.5}])
    lines = table.splitlines()
    assert len(lines) == 3 and "| (e) FPN | n/a | " in lines[2] and "50.0" in lines[2]
    assert "1.50" in lines[2]
