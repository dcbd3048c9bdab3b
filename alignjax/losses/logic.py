"""A loss compiler from preference logic: boolean formulas over model propositions -> semantic losses.

From "Understanding the Logic of Direct Preference Alignment through Logic" (Richardson, Srikumar and
Sabharwal, arXiv 2412.17696). A model's judgement "y is a good answer to x" is a proposition M(x, y) that
holds with a probability p(x, y) read off the log-probs. A preference is a formula F over such
propositions, optionally conditioned on a constraint C; its *semantic loss* is

    L = -log P(F | C) = -log WMC(F and C) + log WMC(C),
    WMC(phi) = sum over assignments a that satisfy phi of prod_i p_i^{a_i} (1 - p_i)^{1 - a_i}

(weighted model counting, propositions independent). With 2-6 propositions the assignments are
enumerated at trace time (a static table), and the sums are log-sum-exps of per-assignment log weights
in float32, built from (log p, log(1 - p)) so that nothing underflows.

The DPO family falls out of one formula, "the chosen answer holds and the rejected one does not, given
that exactly one holds":

    P(M_w and not M_l | M_w xor M_l) = p_w (1-p_l) / (p_w (1-p_l) + (1-p_w) p_l) = s(logit p_w - logit p_l)

- logit p = beta (S - R)      (``M(side, "ratio")``)     -> DPO, -ls(beta (u_w - u_l));
- logit p = beta S            (``"logp"``)               -> CPO's preference term;
- p = exp(S / n)              (``"mean_prob"``)          -> ORPO's odds-ratio term,
                                                            -ls(log odds p_w - log odds p_l);
- logit p = beta S / n        (``"mean_logp"``)          -> SimPO with gamma = 0;
- logit p = beta (S - R) / n  (``"mean_ratio"``)         -> length-normalised DPO (TRL ``sigmoid_norm``).

SimPO's margin gamma is *not* expressible with the two model propositions alone (any formula over M_w,
M_l gives a ratio of polynomials in p_w, p_l without a free constant). It is expressible with one more
proposition that the model does not control: a coin G that holds with probability e^{-gamma}
(``Coin("G", "gamma")``), and the formula "M_w and not M_l and G, given (M_w and not M_l and G) or
(not M_w and M_l)", whose probability is o_w e^{-gamma} / (o_w e^{-gamma} + o_l) = s(logit p_w - logit p_l
- gamma) with o = p / (1 - p). Without a condition (C = True) the formula "M_w and not M_l" gives
-ls(beta u_w) - ls(-beta u_l), which is TRL's ``bco_pair``. NLL terms are the semantic loss of the
single proposition P_w = "y_w is produced" with p = exp(S_w / n_w): -log p = -S_w / n_w, so full CPO and
ORPO losses are sums of weighted semantic-loss terms (:class:`Term`).

    Mw, Ml = M("w", "ratio"), M("l", "ratio")
    loss = compile_loss(Preference(Mw & ~Ml, given=exactly_one(Mw, Ml)), name="logic_dpo")
    losses.spec("logic_dpo").required   # ('chosen_logps', 'rejected_logps', 'ref_chosen_logps', ...)

Formulas are written with ``&`` (and), ``|`` (or), ``~`` (not), ``>>`` (implies), ``^`` (xor).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses.common import as_f32, check_vectors, clamp_lengths, log1mexp
from alignjax.losses.registry import register

Array = jax.Array
_P = inspect.Parameter
MAX_PROPOSITIONS = 8  # 2^8 = 256 assignments per term; beyond that enumeration is the wrong tool
# ORPO's cap: a mean log-prob of exactly 0 (p = 1) would make log(1 - p) = -inf.
_PROB_CAP = -1e-6
# Array inputs in the order the trainer-facing signature lists them (others follow, in first use).
_INPUT_ORDER = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                "chosen_lengths", "rejected_lengths")
SIDES = {"w": "chosen", "l": "rejected", "chosen": "chosen", "rejected": "rejected"}


# ----------------------------------------------------------------------------- formulas


class Formula:
    """A boolean formula over :class:`Atom` propositions (``&``, ``|``, ``~``, ``>>``, ``^``)."""

    def evaluate(self, assignment: Mapping[str, bool]) -> bool:
        raise NotImplementedError

    def atoms(self) -> tuple[Atom, ...]:
        raise NotImplementedError

    def __and__(self, other: Formula) -> Formula:
        return And(self, _formula(other))

    def __or__(self, other: Formula) -> Formula:
        return Or(self, _formula(other))

    def __invert__(self) -> Formula:
        return Not(self)

    def __rshift__(self, other: Formula) -> Formula:
        return Implies(self, _formula(other))

    def __xor__(self, other: Formula) -> Formula:
        return Xor(self, _formula(other))


def _formula(x: object) -> Formula:
    if isinstance(x, bool):
        return Const(x)
    if not isinstance(x, Formula):
        raise TypeError(f"expected a logic Formula (an Atom or a combination of atoms), "
                        f"got {type(x).__name__}")
    return x


def _unique(atoms: Sequence[Atom]) -> tuple[Atom, ...]:
    seen: dict[str, Atom] = {}
    for a in atoms:
        if a.name in seen and seen[a.name] != a:
            raise ValueError(f"two different propositions are both named {a.name!r}: {seen[a.name]} and {a}")
        seen.setdefault(a.name, a)
    return tuple(seen.values())


@dataclasses.dataclass(frozen=True)
class Const(Formula):
    """True or False."""

    value: bool

    def evaluate(self, assignment: Mapping[str, bool]) -> bool:
        return self.value

    def atoms(self) -> tuple[Atom, ...]:
        return ()

    def __str__(self) -> str:
        return "T" if self.value else "F"


TRUE, FALSE = Const(True), Const(False)


@dataclasses.dataclass(frozen=True)
class Not(Formula):
    arg: Formula

    def evaluate(self, assignment: Mapping[str, bool]) -> bool:
        return not self.arg.evaluate(assignment)

    def atoms(self) -> tuple[Atom, ...]:
        return self.arg.atoms()

    def __str__(self) -> str:
        return f"~{self.arg}"


@dataclasses.dataclass(frozen=True)
class _Binary(Formula):
    left: Formula
    right: Formula
    symbol = "?"

    def op(self, a: bool, b: bool) -> bool:
        raise NotImplementedError

    def evaluate(self, assignment: Mapping[str, bool]) -> bool:
        return self.op(self.left.evaluate(assignment), self.right.evaluate(assignment))

    def atoms(self) -> tuple[Atom, ...]:
        return _unique(self.left.atoms() + self.right.atoms())

    def __str__(self) -> str:
        return f"({self.left} {self.symbol} {self.right})"


class And(_Binary):
    symbol = "&"

    def op(self, a: bool, b: bool) -> bool:
        return a and b


class Or(_Binary):
    symbol = "|"

    def op(self, a: bool, b: bool) -> bool:
        return a or b


class Implies(_Binary):
    symbol = "->"

    def op(self, a: bool, b: bool) -> bool:
        return (not a) or b


class Xor(_Binary):
    symbol = "xor"

    def op(self, a: bool, b: bool) -> bool:
        return a != b


def exactly_one(*props: Formula) -> Formula:
    """The "one-true" constraint: exactly one of ``props`` holds (the DPO family's condition)."""
    if len(props) < 2:
        raise ValueError("exactly_one needs at least two propositions")
    out: Formula = FALSE
    for i, p in enumerate(props):
        term: Formula = p
        for j, q in enumerate(props):
            if j != i:
                term = term & ~q
        out = term if out is FALSE else out | term
    return out


# ----------------------------------------------------------------------------- propositions


@dataclasses.dataclass(frozen=True)
class Atom(Formula):
    """A proposition with a probability computed from arrays.

    ``log_probs(values, hyper) -> (log p, log(1 - p))``, each [B] in float32, from the loss's array
    inputs ``values`` (names in ``inputs``) and hyperparameters ``hyper`` (names in ``hypers``).
    Atoms are equal when their names are equal and their fields agree.
    """

    name: str
    inputs: tuple[str, ...] = ()
    hypers: tuple[str, ...] = ()
    log_probs: Callable[[Mapping[str, Array], Mapping[str, float]], tuple[Array, Array]] | None = \
        dataclasses.field(default=None, compare=False)

    def evaluate(self, assignment: Mapping[str, bool]) -> bool:
        return assignment[self.name]

    def atoms(self) -> tuple[Atom, ...]:
        return (self,)

    def __str__(self) -> str:
        return self.name

    def __hash__(self) -> int:
        return hash(self.name)


def _from_logit(z: Array) -> tuple[Array, Array]:
    return jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)


def _from_log_prob(lp: Array) -> tuple[Array, Array]:
    lp = jnp.minimum(lp, _PROB_CAP)
    return lp, log1mexp(lp)


# score -> (inputs for a side s, hypers, (side arrays, hyper) -> (log p, log 1-p)); a side's arrays are
# S = <s>_logps, R = ref_<s>_logps, n = <s>_lengths.
def _ratio(v: Mapping[str, Array]) -> Array:
    return v["logps"] - v["ref_logps"]


def _per_token(x: Array, v: Mapping[str, Array]) -> Array:
    return x / clamp_lengths(v["lengths"])


SCORES: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[..., tuple[Array, Array]]]] = {
    "ratio": (("logps", "ref_logps"), ("beta",), lambda v, h: _from_logit(h["beta"] * _ratio(v))),
    "mean_ratio": (("logps", "ref_logps", "lengths"), ("beta",),
                   lambda v, h: _from_logit(h["beta"] * _per_token(_ratio(v), v))),
    "logp": (("logps",), ("beta",), lambda v, h: _from_logit(h["beta"] * v["logps"])),
    "mean_logp": (("logps", "lengths"), ("beta",),
                  lambda v, h: _from_logit(h["beta"] * _per_token(v["logps"], v))),
    "prob": (("logps",), (), lambda v, h: _from_log_prob(v["logps"])),
    "mean_prob": (("logps", "lengths"), (), lambda v, h: _from_log_prob(_per_token(v["logps"], v))),
}


def _side_name(side: str, key: str) -> str:
    return f"ref_{side}_logps" if key == "ref_logps" else f"{side}_{key}"


def M(side: str, score: str = "ratio", name: str | None = None) -> Atom:
    """The model proposition M(x, y_side), "y_side is a good answer"; side "w"/"chosen" or "l"/"rejected".

    ``score`` picks its probability p (S, R summed policy/reference log-probs, n the length):
    "ratio" logit p = beta (S - R);  "mean_ratio" logit p = beta (S - R) / n;  "logp" logit p = beta S;
    "mean_logp" logit p = beta S / n;  "prob" p = exp(S);  "mean_prob" p = exp(S / n)
    (log p capped at -1e-6 for the last two, as ORPO does, so that log(1 - p) stays finite).
    """
    if side not in SIDES:
        raise ValueError(f"M(side={side!r}): side must be one of {sorted(SIDES)}")
    if score not in SCORES:
        raise ValueError(f"M(score={score!r}): score must be one of {sorted(SCORES)}")
    s = SIDES[side]
    keys, hypers, fn = SCORES[score]
    inputs = tuple(_side_name(s, k) for k in keys)

    def log_probs(values: Mapping[str, Array], hyper: Mapping[str, float]) -> tuple[Array, Array]:
        return fn({k: values[_side_name(s, k)] for k in keys}, hyper)

    label = name or f"M_{score}(x, y_{'w' if s == 'chosen' else 'l'})"
    return Atom(label, inputs, hypers, log_probs)


def Coin(name: str, hyper: str = "gamma") -> Atom:  # noqa: N802  (a constructor, named like the classes)
    """A proposition the model does not control: holds with probability exp(-hyper) (hyper >= 0).

    Used for SimPO's margin: "M_w and not M_l and G" given "(M_w and not M_l and G) or (not M_w and M_l)"
    has probability s(logit p_w - logit p_l - gamma) when P(G) = e^{-gamma}.
    """

    def log_probs(values: Mapping[str, Array], h: Mapping[str, float]) -> tuple[Array, Array]:
        g = float(h[hyper])
        if g < 0:
            raise ValueError(f"Coin({name!r}): hyperparameter {hyper}={g} must be >= 0 (P = exp(-{hyper}))")
        lp = jnp.full((), -g, jnp.float32)
        return lp, log1mexp(jnp.minimum(lp, -1e-30)) if g > 0 else jnp.full((), -jnp.inf, jnp.float32)

    return Atom(name, (), (hyper,), log_probs)


# ----------------------------------------------------------------------------- preferences and terms


@dataclasses.dataclass(frozen=True)
class Preference:
    """A formula and its conditioning constraint: semantic loss -log P(formula | given)."""

    formula: Formula
    given: Formula = TRUE

    def atoms(self) -> tuple[Atom, ...]:
        return _unique(self.formula.atoms() + self.given.atoms())

    def __str__(self) -> str:
        return f"P({self.formula})" if self.given == TRUE else f"P({self.formula} | {self.given})"


@dataclasses.dataclass(frozen=True)
class Term:
    """``weight * -log P(preference)``; ``weight`` a float or the name of a hyperparameter."""

    preference: Preference
    weight: float | str = 1.0


def truth_table(atoms: Sequence[Atom]) -> np.ndarray:
    """All 2^k assignments of ``atoms`` as a bool table [2^k, k] (row i = the binary digits of i)."""
    k = len(atoms)
    return np.array(list(itertools.product([False, True], repeat=k)), dtype=bool).reshape(2 ** k, k)


def models_of(formula: Formula, atoms: Sequence[Atom]) -> np.ndarray:
    """Row indices of :func:`truth_table` (``atoms``) whose assignment satisfies ``formula``."""
    names = [a.name for a in atoms]
    table = truth_table(atoms)
    rows = [i for i, row in enumerate(table) if formula.evaluate(dict(zip(names, row)))]
    return np.array(rows, dtype=np.int64)


def _broadcast_to_batch(lp: Array, batch: tuple[int, ...]) -> Array:
    """An atom's log-probability as float32 of shape ``batch``: a model proposition's [B] as it is, a
    Coin's scalar repeated (``broadcast_to`` refuses any other shape)."""
    return jnp.broadcast_to(jnp.asarray(lp, jnp.float32), batch)


def log_probability(preference: Preference, values: Mapping[str, Array], hyper: Mapping[str, float]) -> Array:
    """log P(formula | given) per example [B], by weighted model counting in log space (float32).

    ``values`` holds the atoms' array inputs ([B] each), ``hyper`` their hyperparameters.
    """
    atoms = preference.atoms()
    if len(atoms) > MAX_PROPOSITIONS:
        raise ValueError(f"{preference}: {len(atoms)} propositions; enumeration supports at most "
                         f"{MAX_PROPOSITIONS}")
    fc = models_of(preference.formula & preference.given, atoms)
    c = models_of(preference.given, atoms)
    if len(fc) == 0:
        raise ValueError(f"{preference}: the formula is unsatisfiable under its condition (P = 0 everywhere)")
    batch = jnp.shape(next(iter(values.values()))) if values else ()
    pairs = [a.log_probs(values, hyper) for a in atoms]
    log_p = jnp.stack([_broadcast_to_batch(p, batch) for p, _ in pairs], -1)  # [B, k]
    log_q = jnp.stack([_broadcast_to_batch(q, batch) for _, q in pairs], -1)
    table = jnp.asarray(truth_table(atoms))  # [2^k, k], static
    # log weight of each assignment: sum_i (a_i log p_i + (1 - a_i) log(1 - p_i)), [B, 2^k].
    log_w = jnp.sum(jnp.where(table, log_p[..., None, :], log_q[..., None, :]), axis=-1)
    log_num = jax.nn.logsumexp(log_w[..., fc], axis=-1)
    if len(c) == len(table):  # no condition: WMC(True) = 1 exactly
        return log_num
    return log_num - jax.nn.logsumexp(log_w[..., c], axis=-1)


# ----------------------------------------------------------------------------- the compiler


def _as_terms(spec: Preference | Term | Sequence[Term | Preference]) -> tuple[Term, ...]:
    items = [spec] if isinstance(spec, (Preference, Term)) else list(spec)
    if not items:
        raise ValueError("compile_loss needs at least one Preference or Term")
    return tuple(t if isinstance(t, Term) else Term(t) for t in items)


def compile_loss(spec: Preference | Term | Sequence[Term | Preference], *, name: str,
                 defaults: Mapping[str, float] | None = None, register_as: str | None = "",
                 family: str = "logic", doc: str = "") -> Callable[..., Array]:
    """Compiles semantic-loss terms into a loss with the trainer-facing signature and registers it.

    The loss is ``sum_t weight_t * -log P(F_t | C_t)`` per example [B] (float32). Its array inputs are
    the atoms' inputs (ordinary parameters, in the order chosen/rejected/ref/lengths) and its
    hyperparameters are keyword-only, so ``losses.spec(name).required`` lists exactly what the trainer
    must compute.

    Args:
      spec: a :class:`Preference`, a weighted :class:`Term`, or a sequence of them (summed).
      name: the loss's name (its ``__name__``, and the registry name unless ``register_as`` says).
      defaults: hyperparameter defaults (``beta`` = 0.1, ``gamma`` = 0.5, ``nll_weight`` = 1.0 unless
        given); every hyperparameter an atom or a weight names needs one.
      register_as: the registry name ("" = ``name``; None = do not register).
      family: the registry family (default "logic").
      doc: text put before the generated docstring.

    Returns:
      The loss function (registered unless ``register_as`` is None).

    Examples:
      "The chosen answer is good and the rejected one is not, given that exactly one is" is DPO:

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> mw, ml = M("w", "ratio"), M("l", "ratio")
      >>> loss = compile_loss(Preference(mw & ~ml, given=exactly_one(mw, ml)), name="my_dpo",
      ...                     register_as=None)
      >>> chosen, rejected = jnp.array([-5.0, -7.0]), jnp.array([-9.0, -6.0])
      >>> ref_chosen, ref_rejected = jnp.array([-6.0, -7.0]), jnp.array([-8.0, -6.0])
      >>> print(np.asarray(loss(chosen, rejected, ref_chosen, ref_rejected), float).round(4))
      [0.5981 0.6931]
    """
    terms = _as_terms(spec)
    defaults = {"beta": 0.1, "gamma": 0.5, "nll_weight": 1.0, **dict(defaults or {})}
    atoms = _unique([a for t in terms for a in t.preference.atoms()])
    used_inputs = {i for a in atoms for i in a.inputs}
    inputs = [n for n in _INPUT_ORDER if n in used_inputs]
    inputs += sorted(used_inputs - set(inputs))
    if not inputs:
        raise ValueError(f"{name}: no proposition depends on the model (every atom is a Coin)")
    hyper_names = [h for a in atoms for h in a.hypers]
    hyper_names += [t.weight for t in terms if isinstance(t.weight, str)]
    hypers = list(dict.fromkeys(hyper_names))
    missing = [h for h in hypers if h not in defaults]
    if missing:
        raise ValueError(f"{name}: hyperparameter(s) {missing} need a default "
                         "(compile_loss(..., defaults={...}))")
    for t in terms:  # fail at compile time, not at the first step
        if len(t.preference.atoms()) > MAX_PROPOSITIONS:
            raise ValueError(f"{name}: {t.preference} has more than {MAX_PROPOSITIONS} propositions")
        if len(models_of(t.preference.formula & t.preference.given, t.preference.atoms())) == 0:
            raise ValueError(f"{name}: {t.preference} is unsatisfiable (its loss would be infinite)")
    sig = inspect.Signature([_P(n, _P.POSITIONAL_OR_KEYWORD) for n in inputs]
                            + [_P(h, _P.KEYWORD_ONLY, default=defaults[h]) for h in hypers])

    def loss(*args: Array, **kwargs: object) -> Array:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        arrays = {n: bound.arguments[n] for n in inputs}
        check_vectors(**arrays)
        values = dict(zip(inputs, as_f32(*arrays.values())))
        hyper = {h: bound.arguments[h] for h in hypers}
        total = jnp.zeros(jnp.shape(values[inputs[0]]), jnp.float32)
        for t in terms:
            w = hyper[t.weight] if isinstance(t.weight, str) else t.weight
            total = total - w * log_probability(t.preference, values, hyper)
        return total

    body = "\n".join(f"  {t.weight if isinstance(t.weight, str) else f'{t.weight:g}'} * -log {t.preference}"
                     for t in terms)
    props = "\n".join(f"  {a.name}: inputs {', '.join(a.inputs) or '-'}" for a in atoms)
    loss.__signature__ = sig  # type: ignore[attr-defined]
    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = (f"{doc.strip() + chr(10) + chr(10) if doc.strip() else ''}"
                    f"Semantic loss compiled by alignjax.losses.logic (weighted model counting):\n{body}\n"
                    f"Propositions:\n{props}\n"
                    "Paper: \"Understanding the Logic of Direct Preference Alignment through Logic\" "
                    "(arXiv 2412.17696).\nShapes: [B] arrays -> [B] float32.")
    if register_as is not None:
        register(register_as or name, family=family)(loss)
    return loss


# ----------------------------------------------------------------------------- library losses as formulas


def one_true_preference(score: str) -> Preference:
    """P(M_w and not M_l | exactly one holds) with both propositions scored by ``score``."""
    mw, ml = M("w", score), M("l", score)
    return Preference(mw & ~ml, given=exactly_one(mw, ml))


def dpo_formula() -> Preference:
    """DPO: -ls(beta (u_w - u_l)) = -log P(M_w & ~M_l | exactly one), logit p = beta (S - R)."""
    return one_true_preference("ratio")


def bco_pair_formula() -> Preference:
    """TRL ``bco_pair``: -ls(beta u_w) - ls(-beta u_l) = -log P(M_w & ~M_l), no condition."""
    return Preference(M("w", "ratio") & ~M("l", "ratio"))


def nll_term(weight: float | str = 1.0) -> Term:
    """NLL of y_w as a per-token mean, -S_w / n_w = -log P(P_w) with p = exp(S_w / n_w)."""
    return Term(Preference(M("w", "mean_prob", name="P(x, y_w)")), weight)


def cpo_formula(nll_weight: float | str = "nll_weight") -> tuple[Term, ...]:
    """CPO: -ls(beta (S_w - S_l)) + nll_weight (-S_w / n_w): one-true preference with logit p = beta S,
    plus the NLL term."""
    return (Term(one_true_preference("logp")), nll_term(nll_weight))


def orpo_formula(beta: str = "beta") -> tuple[Term, ...]:
    """ORPO: -S_w / n_w - beta ls(log odds p_w - log odds p_l), p = exp(S / n): the NLL term plus the
    one-true preference with p = the mean token probability, weighted by ``beta``."""
    return (nll_term(1.0), Term(one_true_preference("mean_prob"), beta))


def simpo_formula() -> Preference:
    """SimPO: -ls(beta (S_w / n_w - S_l / n_l) - gamma) with the margin as a coin G, P(G) = exp(-gamma):
    P(M_w & ~M_l & G | (M_w & ~M_l & G) | (~M_w & M_l)), logit p = beta S / n."""
    mw, ml, g = M("w", "mean_logp"), M("l", "mean_logp"), Coin("G", "gamma")
    return Preference(mw & ~ml & g, given=(mw & ~ml & g) | (~mw & ml))
