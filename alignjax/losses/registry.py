"""The loss registry: names -> pure loss functions, and what each one needs.

A loss declares its inputs by its signature: array inputs are ordinary parameters
(``chosen_logps``, ``ref_chosen_logps``, ``chosen_lengths``, ...), hyperparameters are
keyword-only (after ``*``). The trainer reads :func:`inputs` and computes exactly those arrays
(for example, it runs the reference model only when a ``ref_*`` input is required), so it holds no
loss-specific branches.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

LossFn = Callable[..., object]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, family and the array inputs it takes."""

    name: str
    fn: LossFn
    family: str
    required: tuple[str, ...]  # array inputs without a default
    optional: tuple[str, ...]  # array inputs with a default (usually None)
    hyperparameters: dict[str, object]  # keyword-only arguments and their defaults
    stateful: bool  # takes and returns explicit state (e.g. BCO's running reward mean)

    @property
    def needs_reference(self) -> bool:
        return any(n.startswith("ref_") for n in self.required)


_REGISTRY: dict[str, LossSpec] = {}
_ALIASES: dict[str, str] = {}


def _spec(name: str, fn: LossFn, family: str, stateful: bool) -> LossSpec:
    required, optional, hyper = [], [], {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            hyper[p.name] = None if p.default is p.empty else p.default
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY):
            (required if p.default is p.empty else optional).append(p.name)
    return LossSpec(name, fn, family, tuple(required), tuple(optional), hyper, stateful)


def register(name: str, *, family: str, aliases: tuple[str, ...] = (), stateful: bool = False):
    """Decorator: registers ``fn`` under ``name`` (and ``aliases``, e.g. TRL's ``loss_type``)."""

    def wrap(fn: LossFn) -> LossFn:
        for key in (name, *aliases):
            if key in _REGISTRY or key in _ALIASES:
                raise ValueError(f"loss name {key!r} is registered twice")
        _REGISTRY[name] = _spec(name, fn, family, stateful)
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return wrap


def canonical(name: str) -> str:
    """Resolves an alias to the registered name; unknown names raise with the valid list."""
    if name in _REGISTRY:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise KeyError(f"unknown loss {name!r}; registered losses: {', '.join(names())}")


def get(name: str) -> LossFn:
    """The loss function registered as ``name`` (or one of its aliases)."""
    return _REGISTRY[canonical(name)].fn


def spec(name: str) -> LossSpec:
    return _REGISTRY[canonical(name)]


def inputs(name: str) -> tuple[str, ...]:
    """Names of the array inputs the loss requires."""
    return spec(name).required


def aliases(name: str) -> tuple[str, ...]:
    """The aliases registered for ``name`` (or for the loss an alias points to), sorted."""
    target = canonical(name)
    return tuple(sorted(a for a, n in _ALIASES.items() if n == target))


def names(include_aliases: bool = True) -> list[str]:
    """All registered names (and aliases), sorted."""
    keys = set(_REGISTRY) | (set(_ALIASES) if include_aliases else set())
    return sorted(keys)
