"""A configuration checked as a whole before any work: every value on its own
(:func:`train.config.check_values`), the model's own option names (:func:`train.build.check_model_options`)
and the analog keys (device model, algorithm and its settings: :func:`train.analog.check_config`;
analog_mode and the inference keys: :func:`train.inference.check_config`).
Each problem raises :class:`train.config.ConfigError` in one line naming the key.
"""
from __future__ import annotations

from .analog import check_config as check_analog
from .build import check_model_options
from .config import TrainConfig, check_values, parse_model_options
from .inference import check_config as check_inference


def validate(cfg: TrainConfig) -> TrainConfig:
    check_values(cfg)
    check_model_options(cfg.model, parse_model_options(cfg.model_options))
    check_analog(cfg)
    check_inference(cfg)
    return cfg
