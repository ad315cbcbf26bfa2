"""Experiment configuration: typed dataclasses, YAML files, params_override.

    from fpn_tf.configs import load_config
    cfg = load_config("configs/coco_r50_fpn_1x.yaml", "train.total_steps=1000")

The learning-rate schedule built from the ``train`` section is fpn_tf.training.lr_schedule.
"""

from fpn_tf.configs.experiment import (
    AnchorConfig,
    BackboneConfig,
    Config,
    ConfigError,
    DataConfig,
    DetectionConfig,
    EvalConfig,
    ExperimentConfig,
    FPNConfig,
    ModelConfig,
    BoxHeadConfig,
    MaskHeadConfig,
    RoIAlignerConfig,
    RoISamplerConfig,
    ResizeConfig,
    RPNConfig,
    RuntimeConfig,
    SyntheticDataConfig,
    TrainConfig,
)
from fpn_tf.configs.loader import (
    PARAMS_FILENAME,
    load_config,
    load_yaml,
    parse_params_override,
    save_config,
)
