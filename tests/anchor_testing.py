"""The paper's anchors (FPN §4.1, the config's AnchorConfig defaults) for the op tests."""

from fpn_tf.ops import anchors as anchor_lib

LEVELS = ("P2", "P3", "P4", "P5", "P6")
SIZES = {"P2": (32,), "P3": (64,), "P4": (128,), "P5": (256,), "P6": (512,)}
RATIOS = (0.5, 1.0, 2.0)


def paper_anchors(image_size, levels=LEVELS, sizes=None, aspect_ratios=RATIOS, **kwargs):
    """``generate_anchors`` with the paper's levels, sizes and ratios (offset 0.5) unless given."""
    kwargs.setdefault("offset", 0.5)
    return anchor_lib.generate_anchors(
        image_size, levels, SIZES if sizes is None else sizes, aspect_ratios, **kwargs
    )
