"""The loss registry: names -> pure loss functions, and what each one needs.

A loss declares its inputs by its signature: array inputs are ordinary parameters
(``chosen_logps``, ``ref_chosen_logps``, ``chosen_lengths``, ...), hyperparameters are
keyword-only (after ``*``). The trainer reads :func:`inputs` and computes exactly those arrays
(for example, it runs the reference model only when a ``ref_*`` input is required), so it holds no
loss-specific branches.

Registration checks the contract: every required input must be one :mod:`alignjax.losses.providers`
declares (provided by the step, or pending with what would provide it), unless the family is trained
by its own job. :attr:`LossSpec.status` then says, from the provider table alone, whether the
preference step trains the loss and on which data kinds.

Registering the same name again is allowed when it is the same function (a module imported twice,
e.g. an experiment file that ``main.check_overrides`` loads before ``config_flags`` does) or when the
caller says ``replace=True`` (a notebook iterating on a loss); any other second registration of a name
is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from alignjax.losses import providers as inputs_table

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
    # hyperparameters -> the scale of the implicit reward r = scale * (S - R) in TRL's reward metrics
    reward_scale: Callable[[dict[str, Any]], float] | None = None

    @property
    def needs_reference(self) -> bool:
        """A required input comes from the reference model (its ``ref_*`` log-probs or a provider
        computed from the reference's outputs)."""
        providers = inputs_table.PROVIDERS
        return any(n.startswith("ref_") or (n in providers and providers[n].model == "ref")
                   for n in self.required)

    @property
    def status(self) -> inputs_table.Status:
        """Whether the preference step trains this loss, on which data kinds, and what is missing."""
        return inputs_table.status(self.family, self.required)

    @property
    def trainable(self) -> bool:
        """The preference step can supply every required input (for at least one data kind)."""
        return self.status.trains

    def beta(self, hyper: dict[str, Any] | None = None) -> float:
        """The implicit reward's scale for metrics: ``reward_scale(h)``, else ``beta``, else 1."""
        h = {**self.hyperparameters, **(hyper or {})}
        if self.reward_scale is not None:
            return float(self.reward_scale(h))
        return float(h["beta"]) if h.get("beta") is not None else 1.0


_REGISTRY: dict[str, LossSpec] = {}
_ALIASES: dict[str, str] = {}


def _spec(name: str, fn: LossFn, family: str, stateful: bool, reward_scale: Any = None) -> LossSpec:
    required, optional, hyper = [], [], {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            hyper[p.name] = None if p.default is p.empty else p.default
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY):
            (required if p.default is p.empty else optional).append(p.name)
    return LossSpec(name, fn, family, tuple(required), tuple(optional), hyper, stateful, reward_scale)


def _definition(fn: LossFn) -> tuple[object, ...]:
    """Where ``fn`` is defined: its qualified name and source file and line (the module name is not
    used: a config file executed twice gets a different module name each time)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return (getattr(fn, "__qualname__", None), getattr(fn, "__module__", None))
    where = (code.co_filename, code.co_firstlineno)
    # The docstring tells apart composites built by one modifier (they share its inner function).
    return (getattr(fn, "__qualname__", None), getattr(fn, "__doc__", None), *where)


def _same_function(a: LossFn, b: LossFn) -> bool:
    """The same definition: the same object, or one defined at the same place (a re-import)."""
    return a is b or _definition(a) == _definition(b)


def register(name: str, *, family: str, aliases: tuple[str, ...] = (), stateful: bool = False,
             replace: bool = False, reward_scale: Callable[[dict[str, Any]], float] | None = None):
    """Decorator: registers ``fn`` under ``name`` (and ``aliases``, e.g. TRL's ``loss_type``).

    ``replace=True`` lets a name (and its aliases) point to a new function; without it, only the same
    function may be registered again. ``reward_scale(hyperparameters)`` is the implicit reward's
    scale for metrics (default: ``beta``)."""

    def wrap(fn: LossFn) -> LossFn:
        for key in (name, *aliases):
            owner = _REGISTRY.get(key) or (_REGISTRY.get(_ALIASES[key]) if key in _ALIASES else None)
            if owner is None or replace:
                continue
            if owner.name != name or not _same_function(owner.fn, fn):
                raise ValueError(
                    f"loss name {key!r} is registered twice ({owner.fn.__module__}.{owner.fn.__qualname__} "
                    f"and {fn.__module__}.{fn.__qualname__}); pass replace=True to register(...) to "
                    "replace it")
        spec = _spec(name, fn, family, stateful, reward_scale)
        unknown = inputs_table.unknown_inputs(family, spec.required)
        if unknown:
            raise ValueError(
                f"loss {name!r}: no provider is declared for its input(s) {unknown}; use the names in "
                "alignjax/losses/providers.py (PROVIDERS), or give the inputs defaults")
        _REGISTRY[name] = spec
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
    """The loss function registered as ``name`` (or one of its aliases).

    Args:
      name: a registered name or alias (TRL's ``loss_type`` names are aliases).

    Returns:
      The pure loss function.

    Raises:
      KeyError: for an unknown name, listing the registered ones.

    Examples:
      >>> import jax.numpy as jnp
      >>> from alignjax import losses
      >>> loss = losses.get("sigmoid")  # TRL's name for DPO
      >>> loss.__name__
      'dpo'
      >>> logps = jnp.array([-3.0])
      >>> round(float(loss(logps, logps, logps, logps)[0]), 4)  # policy = reference: log 2
      0.6931
    """
    return _REGISTRY[canonical(name)].fn


def spec(name: str) -> LossSpec:
    """The :class:`LossSpec` of ``name`` (or of the loss an alias points to).

    Args:
      name: a registered name or alias.

    Returns:
      Its function, family, required and optional array inputs and hyperparameter defaults.

    Examples:
      >>> from alignjax import losses
      >>> s = losses.spec("simpo")
      >>> s.family, s.required
      ('reference_free', ('chosen_logps', 'rejected_logps', 'chosen_lengths', 'rejected_lengths'))
      >>> s.hyperparameters
      {'beta': 2.0, 'gamma': 0.5, 'label_smoothing': 0.0}
      >>> losses.spec("simpo").needs_reference, losses.spec("dpo").needs_reference
      (False, True)
    """
    return _REGISTRY[canonical(name)]


def inputs(name: str) -> tuple[str, ...]:
    """Names of the array inputs the loss requires."""
    return spec(name).required


def aliases(name: str) -> tuple[str, ...]:
    """The aliases registered for ``name`` (or for the loss an alias points to), sorted."""
    target = canonical(name)
    return tuple(sorted(a for a, n in _ALIASES.items() if n == target))


def names(include_aliases: bool = True, *, trainable: bool | None = None) -> list[str]:
    """All registered names (and aliases), sorted.

    Args:
      include_aliases: list the aliases too (default True).
      trainable: True / False: only the losses the preference step does / does not train
        (``spec(name).status``, from the provider table); None (default): all.

    Returns:
      A sorted list of names.

    Examples:
      >>> from alignjax import losses
      >>> {"dpo", "sigmoid", "kto", "grpo"} <= set(losses.names())
      True
      >>> "sigmoid" in losses.names(include_aliases=False)
      False
      >>> "dpo" in losses.names(trainable=True), "grpo" in losses.names(trainable=True)
      (True, False)
    """
    keys = set(_REGISTRY) | (set(_ALIASES) if include_aliases else set())
    if trainable is not None:
        keys = {k for k in keys if spec(k).trainable == trainable}
    return sorted(keys)


def load_module(module: str, *, key: str = "config.loss.module") -> None:
    """Imports a user's module of losses (a dotted module name or a ``.py`` path), so that the losses
    it registers can be named in a config. Importing the same module again does nothing (a path is
    imported once under a name derived from its absolute path)."""
    if not module:
        return
    if module.endswith(".py") or os.sep in module:
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}={module!r}: no such file")
        name = "_alignjax_losses_" + hashlib.sha256(path.encode()).hexdigest()[:12]
        if name in sys.modules:
            return
        spec_ = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec_)
        sys.modules[name] = mod
        try:
            spec_.loader.exec_module(mod)  # type: ignore[union-attr]
        except BaseException:
            del sys.modules[name]
            raise
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ValueError(f"{key}={module!r}: cannot import it ({err})") from None
