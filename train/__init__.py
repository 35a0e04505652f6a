"""Training system for ffebm: data sets, recipes, trainer, checkpoints, logging, evaluation.

Command line: ``python -m train [RECIPE] [key=value ...] [--out DIR] [--resume RUN_DIR]``
(``python -m train --list`` shows recipes and keys); evaluation: ``python -m train.evaluate RUN_DIR``.
"""

from .config import ConfigError, TrainConfig, UserError
from .recipes import RECIPES, available as available_recipes, build_config

__all__ = ["TrainConfig", "ConfigError", "UserError", "RECIPES", "available_recipes", "build_config", "train"]


def train(*args, **kwargs):
    """Run a training (see :func:`train.trainer.train`)."""
    from .trainer import train as _train

    return _train(*args, **kwargs)
