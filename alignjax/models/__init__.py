"""alignjax.models: the sharded Flax decoder (Llama / Mistral / Qwen2 / Qwen3), presets and HF I/O.

Public: ``ModelConfig``, ``Model``, ``from_pretrained``, ``save_pretrained``, ``PRESETS``.
"""

from alignjax.models.config import AUX_HEADS, SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from alignjax.models.hf import from_pretrained, load_params, save_pretrained, tensor_maps
from alignjax.models.model import Model
from alignjax.models.presets import PRESETS

__all__ = [
    "AUX_HEADS",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "Model",
    "ModelConfig",
    "RopeScaling",
    "from_pretrained",
    "load_params",
    "save_pretrained",
    "tensor_maps",
]
