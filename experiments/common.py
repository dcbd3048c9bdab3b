"""The shared config code, which lives in :mod:`alignjax.configs`; kept under this name for
experiment files that still import ``experiments.common``."""

from alignjax.configs import (  # noqa: F401
    ConfigDict,
    arithmetic_data,
    base_config,
    fill_loss_hyperparameters,
    parse_arg,
    quickstart_model,
    runlocal,
)
