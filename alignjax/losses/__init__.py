"""Preference objectives as pure functions of arrays, and their registry.

``get(name)`` returns a loss function, ``names()`` lists them (``names(trainable=True)``: the ones the
preference step trains), ``spec(name)`` says what it needs and ``spec(name).status`` where it trains;
``providers`` is the table of how the step computes each input.
Each family module registers its losses on import; ``docs/losses.md`` lists them all
(regenerate with ``python -m alignjax.losses.docs``).
"""

# Family modules register their losses on import (modifiers imports pairwise itself).
from alignjax.losses import (
    common,
    diffusion,
    listwise,
    modifiers,
    pairwise,
    policy_gradient,
    providers,
    reference_free,
    reward,
    step_level,
    supervised,
    token_level,
    unpaired,
)
from alignjax.losses.metrics import preference_metrics
from alignjax.losses.registry import (
    LossSpec,
    aliases,
    canonical,
    get,
    inputs,
    load_module,
    names,
    register,
    spec,
)

__all__ = [
    "LossSpec", "aliases", "canonical", "get", "inputs", "load_module", "names", "register", "spec",
    "common", "pairwise", "reference_free", "listwise", "step_level", "modifiers", "unpaired", "token_level",
    "reward", "diffusion", "policy_gradient", "supervised", "preference_metrics", "providers",
]
