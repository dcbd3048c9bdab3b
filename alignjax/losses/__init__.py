"""Preference objectives as pure functions of arrays, and their registry.

``get(name)`` returns a loss function, ``names()`` lists them, ``spec(name)`` says what it needs.
Each family module registers its losses on import.
"""

from alignjax.losses.registry import LossSpec, canonical, get, inputs, names, register, spec

__all__ = ["LossSpec", "canonical", "get", "inputs", "names", "register", "spec"]
