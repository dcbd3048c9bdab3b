"""The preference / SFT train step: a sequence batch in, exactly the losses' declared inputs out.

The step never branches on the loss. ``alignjax.losses.spec(name).required`` lists the arrays a
loss takes, and :data:`alignjax.losses.providers.PROVIDERS` says where each comes from; the step has one
function per provider *source* (:data:`SOURCES`): per-sequence sums, lengths, token log-probs and
masks of the policy and reference forwards, statistics of their next-token distributions (WPO's
weights, SparsePO's token KL and activation masks: the forwards then keep their logits / hidden
states), per-example data columns (``labels``, visit counts, source log-probs, listwise scores) and
cached reference sums. Sequences ``0..B-1`` of a batch are the chosen (or single, or
desirable/undesirable) completions, ``B..2B-1`` the rejected (or KTO's mismatched KL) completions;
SFT batches hold only ``0..B-1``; listwise batches hold candidate k of example i as sequence
``k B + i``, and their sequence inputs are ``[B, K]``.

``config.loss.name`` may name several losses (``"sigmoid+bco_pair+sft"``) with ``config.loss.weights``:
the objective is ``sum_i w_i mean_B(loss_i)``, TRL's ``loss_type=[...]`` with ``loss_weights``.

Batches enter the step stacked as ``[k, ...]``: ``k = config.optim.grad_accum_steps`` micro-batches,
scanned with gradients summed and divided by ``k``, so that one optimiser update sees the mean of
the micro-batch losses, which is the full-batch mean loss when micro-batches have equal size.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import alignjax.losses as losses
from alignjax import logprobs
from alignjax.data.batching import counted_width
from alignjax.data.tokenize import RATIONALE_TEMPLATE
from alignjax.losses import providers as inputs_table
from alignjax.losses.metrics import preference_metrics
from alignjax.models import lora
from alignjax.models.heads import mean_completion_state
from alignjax.models.softmax import logsumexp
from alignjax.sharding import replicated
from alignjax.train.reference import ema_update

Array = jax.Array
State = dict[str, Any]

KINDS = ("pairwise", "step", "sft", "unpaired", "listwise")  # alignjax.data kinds this step trains on
# Kinds whose batches hold two sequences an example (chosen, rejected); "step" adds visit counts.
PAIRED = ("pairwise", "step")
# Kinds laid out as 2B sequences: pairs, and unpaired batches with KTO's mismatched (KL) sequences.
TWO_SEQUENCE = (*PAIRED, "unpaired")
PARTS = ("first", "second", "third", "fourth")  # sequences 0..B-1, B..2B-1, 2B..3B-1, 3B..4B-1
DROPOUT_KEY = "lora_dropout_rng"  # the micro-batch entry the train step adds for LoRA dropout
# config.loss keys that are not hyperparameters of one loss.
_LOSS_KEYS = ("name", "weights", "module", "nll_weight")
# What each distribution statistic needs from which forward ("logits" or "hidden").
_STAT_NEEDS = {
    "wpo": {"policy": "logits"},
    "token_kl": {"policy": "logits", "ref": "logits"},
    "activation_mask": {"ref": "hidden"},
}


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of what a step computes (hashable, closed over by jit).

    ``reference``: "model" (run a reference forward with ``state["ref_params"]``), "batch" (the
    reference log-probs arrive in the batch from the on-disk cache) or "none" (reference-free).
    ``components``: ``(loss name, weight, hyperparameters)`` per mixed loss; the objective is
    ``sum_i weight_i * mean_B(loss_i)`` as TRL's ``loss_type=[...]`` with ``loss_weights``.
    ``nll_weight``: the trainer's RPO-style ``+ w * mean token NLL of y_w`` (only when no component
    takes its own ``nll_weight``).
    """

    loss: str
    hyperparameters: tuple[tuple[str, Any], ...]
    kind: str
    batch_size: int  # examples per micro-batch (global)
    reference: str
    nll_weight: float = 0.0
    vocab_chunk: int | None = None
    seq_chunk: int | None = None
    logit_width: int | None = None  # most counted tokens a row holds: the head runs at those only
    nan_at_step: int = -1
    components: tuple[tuple[str, float, tuple[tuple[str, Any], ...]], ...] = ()
    provider_hyperparameters: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.components:  # a single loss taking every hyperparameter
            object.__setattr__(self, "components", ((self.loss, 1.0, self.hyperparameters),))

    @property
    def num_sequences(self) -> int:
        if self.kind == "listwise":
            raise ValueError("listwise batches hold K sequences an example: use sequences_in(batch)")
        if self.kind in TWO_SEQUENCE:
            return max(2, parts_read(self.required)) * self.batch_size
        return self.batch_size

    def sequences_in(self, batch: Mapping[str, Array]) -> int:
        """Sequences of ``batch`` (static): ``K * B`` for listwise batches of K candidates."""
        if self.kind == "listwise":
            return self.batch_size * int(_candidates(batch))
        return self.num_sequences

    @property
    def logprob_options(self) -> dict[str, Any]:
        """The step's log-prob path (``logprobs.batch_sequence_logps`` keywords): every program whose
        log-probs are compared with the step's (evaluation, the reference cache) computes with these."""
        return dict(vocab_chunk=self.vocab_chunk, seq_chunk=self.seq_chunk, logit_width=self.logit_width)

    @property
    def specs(self) -> tuple[losses.LossSpec, ...]:
        return tuple(losses.spec(name) for name, _, _ in self.components)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for s in self.specs for n in s.required))

    @property
    def stateful(self) -> bool:
        return any(s.stateful for s in self.specs)

    @property
    def needs_reference(self) -> bool:
        return any(s.needs_reference for s in self.specs)

    @property
    def beta(self) -> float:
        """The implicit reward's scale for TRL's reward metrics (the first component's)."""
        name, _, hyper = self.components[0]
        return losses.spec(name).beta(dict(hyper))


def _parts_of(p: inputs_table.Provider) -> tuple[str, ...]:
    return p.parts or (p.part,)


def parts_read(required: Sequence[str]) -> int:
    """How many of :data:`PARTS` the inputs ``required`` read (a pair's sequences per example)."""
    table = inputs_table.PROVIDERS
    used = [part for n in required if n in table for part in _parts_of(table[n])]
    return max((PARTS.index(u) + 1 for u in used if u in PARTS), default=1)


def reads_rationales(required: Sequence[str]) -> bool:
    """Batches carry a third sequence per pair, the rationale (``rationale_logps``)."""
    return "rationale_logps" in required


def reads_degrees(required: Sequence[str]) -> bool:
    """Batches carry SPO's degraded chosen and rejected responses and their ``degree_labels``."""
    return "degree_labels" in required or "degree_logits" in required


def sequence_options(config: Any) -> dict[str, Any]:
    """The data pipeline's options for the sequences the losses of ``config.loss`` read beyond the
    pair: Rationale-DPO's rationale (``rationale_template``), SPO's degraded responses
    (``degree_removals``)."""
    required = [r for n, _ in loss_components(config.loss) for r in losses.spec(n).required]
    out: dict[str, Any] = {}
    if reads_rationales(required):
        out["rationale_template"] = config.data.get("rationale_template") or RATIONALE_TEMPLATE
    if reads_degrees(required):
        given = config.loss.get("degree_removals")
        default = inputs_table.provider_hyperparameters(("degree_logits",))["degree_removals"]
        out["degree_removals"] = int(default if given is None else given)
    return out


def aux_heads(
    required: Sequence[str], provider_hyperparameters: Mapping[str, Any]
) -> tuple[tuple[str, int], ...]:
    """The policy's aux classifiers (``ModelConfig.aux_heads``) the inputs ``required`` read."""
    heads = {}
    for name in required:
        p = inputs_table.PROVIDERS.get(name)
        if p is not None and p.source == "head":
            hyper = {k: provider_hyperparameters[k] for k, _ in p.hyper}
            heads[p.head] = p.classes or int(_transform(p.transform)(**hyper))
    return tuple(heads.items())


def check_aux_heads(model: Any, heads: Sequence[tuple[str, int]]) -> None:
    """Refuses a given model (``run_train(model=...)``) that lacks an aux classifier the loss reads."""
    have = dict(getattr(model.config, "aux_heads", ()))
    for name, classes in heads:
        if have.get(name) != classes:
            raise ValueError(
                f"the loss reads the policy's {name!r} classifier ({classes} classes), which the given "
                f"model does not have (its aux_heads: {sorted(have.items())}); build it with "
                f"ModelConfig.aux_heads=({(name, classes)},) or let the train loop build the model"
            )


def _candidates(batch: Mapping[str, Array]) -> int:
    for key in ("scores", "lengths"):
        if key in batch and jnp.ndim(batch[key]) == 2:
            return int(batch[key].shape[-1])
    raise ValueError("a listwise batch needs its [B, K] 'scores' (the data kind 'listwise' gives them)")


def loss_components(config_loss: Any) -> list[tuple[str, float]]:
    """``config.loss.name`` (one name, names joined by ``+`` or ``,``, or a list) and
    ``config.loss.weights`` (one per name; empty = all 1.0) as ``[(canonical name, weight)]``."""
    name = config_loss.name
    names = [n.strip() for n in name.replace(",", "+").split("+")] if isinstance(name, str) else list(name)
    names = [n for n in names if n]
    if not names:
        raise ValueError("config.loss.name is empty: name a loss from alignjax.losses.names()")
    weights = config_loss.get("weights") or ()
    if isinstance(weights, str):
        weights = [float(w) for w in weights.replace(",", "+").split("+") if w.strip()]
    weights = list(weights) or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(
            f"config.loss.weights={tuple(weights)} has {len(weights)} entries for the {len(names)} losses "
            f"of config.loss.name={name!r}"
        )
    out = []
    for n, w in zip(names, weights):
        try:
            canonical = losses.canonical(n)
        except KeyError as err:
            raise KeyError(f"config.loss.name: {err.args[0]}") from None
        out.append((canonical, float(w)))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"config.loss.name={name!r} names a loss twice")
    return out


def _label(config_loss: Any) -> str:
    name = config_loss.name
    return name if isinstance(name, str) else "+".join(name)


def check_loss_config(config: Any) -> None:
    """Refuses, before any compilation, a ``config.loss`` the step cannot train: an unknown name, a
    loss whose inputs no provider supplies, or one the data kind / layout cannot feed."""
    data = config.get("data", {})
    kind = data.get("kind")
    layout = data.get("layout", "padded")
    vocab_chunk = config.get("train", {}).get("vocab_chunk") or None
    seq_chunk = config.get("train", {}).get("seq_chunk") or None
    comps = loss_components(config.loss)
    for name, _ in comps:
        check_inputs_provided(
            losses.spec(name), kind=kind, layout=layout, chunked=bool(vocab_chunk or seq_chunk)
        )
    required = [r for n, _ in comps for r in losses.spec(n).required]
    if reads_rationales(required) and reads_degrees(required):
        raise ValueError(
            f"config.loss.name={_label(config.loss)!r}: rationales and SPO's degraded responses both "
            "take a pair's third sequence; train them in separate runs"
        )
    stateful = [n for n, _ in comps if losses.spec(n).stateful]
    if stateful and len(comps) > 1:
        raise ValueError(f"config.loss.name: {stateful[0]!r} keeps its own state and cannot be mixed")


def check_data_columns(config: Any, batch_keys: Any, source: Any) -> None:
    """Refuses, before the model is built, a loss that reads a data column the batches of
    ``source`` do not carry (``batch_keys``: the keys of one host batch)."""
    for name, _ in loss_components(config.loss):
        missing = [c for c in losses.spec(name).status.columns if c not in batch_keys]
        if missing:
            raise ValueError(
                f"config.loss.name={name!r} reads the data column(s) {missing}, which the rows of "
                f"config.data.source={source} do not carry (give them on every row)"
            )


def check_inputs_provided(
    spec: losses.LossSpec, *, kind: str | None = None, layout: str | None = None, chunked: bool = False
) -> None:
    """Refuses a loss whose array inputs this step cannot supply (for ``kind``/``layout``), naming
    the loss, the missing input and what would provide it."""
    status = spec.status
    where = f"config.loss.name={spec.name!r}"
    if spec.family in inputs_table.OWN_JOB:
        raise ValueError(f"{where}: a {spec.family} loss, trained by {status.trained_by}, not by this step")
    if status.missing:
        needs = "; ".join(f"{n!r} needs {inputs_table.what_would_provide(n)}" for n in status.missing)
        raise ValueError(
            f"{where}: the preference step cannot supply its input(s) {list(status.missing)}: {needs}"
        )
    if kind is not None and kind not in status.kinds:
        lacking = [n for n in spec.required if kind not in inputs_table.PROVIDERS[n].kinds]
        raise ValueError(
            f"{where} needs input {lacking[0]!r}, which config.data.kind={kind!r} batches do not have; "
            f"it trains on config.data.kind in {list(status.kinds)} "
            f"({inputs_table.what_would_provide(lacking[0])})"
        )
    per_token = [n for n in spec.required if inputs_table.PROVIDERS[n].per_token]
    if per_token and layout not in (None, "padded"):
        raise ValueError(
            f"{where} takes per-token input {per_token[0]!r}, which this step builds for "
            f"config.data.layout='padded' only (got {layout!r})"
        )
    prompts = [n for n in spec.required if inputs_table.PROVIDERS[n].source == "prompt"]
    if prompts and layout == "shared_prompt":
        raise ValueError(
            f"{where} takes {prompts[0]!r}, each sequence's own prompt log-prob, which the shared-prompt "
            "layout does not separate: set config.data.layout to 'padded' or 'packed'"
        )
    stats = [n for n in spec.required if inputs_table.PROVIDERS[n].source in ("distribution", "head")]
    if stats and chunked:
        raise ValueError(
            f"{where} takes {stats[0]!r}, computed from the full hidden states or next-token "
            "distributions, which the vocabulary-chunked path does not form: set "
            "config.train.vocab_chunk=0 and seq_chunk=0"
        )


def make_step_spec(config: Any, batch_size: int, reference: str) -> StepSpec:
    """Builds the StepSpec from ``config.loss`` / ``config.data`` and checks it can be satisfied.

    ``config.loss`` holds ``name`` (one loss or a mix), ``weights``, ``nll_weight`` and the losses'
    (and their inputs' providers') keyword-only hyperparameters; each key goes to every component
    that takes it (as TRL shares ``beta``), and a key none takes is an error naming it.
    ``nll_weight`` is the loss's own where a component has one (``cpo``, ``rpo``, ``spar``), else the
    trainer's added NLL term; unset (None) means the loss's default and no added term.
    """
    kind = config.data.kind
    if kind not in KINDS:
        raise ValueError(f"config.data.kind={kind!r}; choose one of {list(KINDS)}")
    check_loss_config(config)
    comps = loss_components(config.loss)
    specs = [losses.spec(n) for n, _ in comps]
    required = tuple(dict.fromkeys(r for s in specs for r in s.required))
    optional = tuple(o for s in specs for o in s.optional)
    provider_hyper = inputs_table.provider_hyperparameters(required + optional)
    given = {k: v for k, v in config.loss.items() if k not in _LOSS_KEYS and v is not None}
    nll = config.loss.get("nll_weight")
    own_nll = any("nll_weight" in s.hyperparameters for s in specs)
    if nll is not None and own_nll:
        given["nll_weight"] = nll
    for key in given:
        if key not in provider_hyper and not any(key in s.hyperparameters for s in specs):
            taken = sorted({h for s in specs for h in s.hyperparameters} | set(provider_hyper))
            raise ValueError(
                f"config.loss.{key}: loss {_label(config.loss)!r} has no hyperparameter {key!r}; "
                f"its hyperparameters: {taken}"
            )
    components = tuple(
        (s.name, w, tuple(sorted((k, v) for k, v in given.items() if k in s.hyperparameters)))
        for s, (_, w) in zip(specs, comps)
    )
    provider = tuple(
        sorted({**provider_hyper, **{k: v for k, v in given.items() if k in provider_hyper}}.items())
    )
    merged = {k: v for _, _, h in components for k, v in h}
    data = config.get("data", {})
    step_spec = StepSpec(
        loss="+".join(n for n, _ in comps),
        hyperparameters=tuple(sorted(merged.items())),
        kind=kind,
        batch_size=int(batch_size),
        reference=reference if any(s.needs_reference for s in specs) else "none",
        nll_weight=0.0 if (own_nll or nll is None) else float(nll),
        vocab_chunk=config.get("train", {}).get("vocab_chunk") or None,
        seq_chunk=config.get("train", {}).get("seq_chunk") or None,
        logit_width=counted_width(data.get("layout", "padded"), data.get("max_completion_length", 0)),
        nan_at_step=int(config.get("train", {}).get("nan_at_step", -1)),
        components=components,
        provider_hyperparameters=provider,
    )
    ref_inputs = [n for n in required if inputs_table.PROVIDERS[n].model == "ref"]
    if step_spec.needs_reference and reference == "none":
        raise ValueError(
            f"loss {step_spec.loss!r} needs reference log-probs ({ref_inputs}) "
            "but config.reference.kind='none'; use frozen, cache or ema"
        )
    if reference == "batch":
        bad = [n for n in ref_inputs if not inputs_table.PROVIDERS[n].cacheable or kind == "listwise"]
        if bad:
            raise ValueError(
                f"config.reference.kind='cache' holds per-sequence sums of pairs only; loss "
                f"{step_spec.loss!r} needs {bad}: use kind=frozen"
            )
    return step_spec


# ----------------------------------------------------------------------------- providers, by source


def _shift_right(values: Array) -> Array:
    """A value computed at position t for token t + 1, moved to t + 1 (0 at t = 0)."""
    return jnp.concatenate([jnp.zeros_like(values[:, :1]), values[:, :-1]], axis=1)


def _wpo_stat(policy: Mapping[str, Array], ref: Any, batch: Mapping[str, Array], n: int) -> Array:
    """[N] mean over each sequence's tokens of log p_t - log sum_v p_v^2 (policy, no gradient)."""
    z = jax.lax.stop_gradient(policy["logits"]).astype(jnp.float32)
    log_sum_sq = logsumexp(2.0 * z, axis=-1) - 2.0 * logsumexp(z, axis=-1)
    mask = batch["loss_mask"].astype(jnp.float32)
    aligned = (jax.lax.stop_gradient(policy["tok"]) - _shift_right(log_sum_sq)) * mask
    total = logprobs.sequence_logps(aligned, mask, batch["example_ids"], n)
    count = logprobs.sequence_lengths(mask, batch["example_ids"], n)
    return total / jnp.maximum(count, 1.0)


def _token_kl_stat(policy: Mapping[str, Array], ref: Mapping[str, Array], batch: Any, n: int) -> Array:
    """[R, T] k_t = sum_v pi_ref(v) (log pi(v) - log pi_ref(v)) for token t (0 off the loss mask)."""
    lp = jax.nn.log_softmax(policy["logits"].astype(jnp.float32), axis=-1)
    lq = jax.lax.stop_gradient(jax.nn.log_softmax(ref["logits"].astype(jnp.float32), axis=-1))
    k = jnp.sum(jnp.exp(lq) * (lp - lq), axis=-1)
    return _shift_right(k) * batch["loss_mask"].astype(jnp.float32)


def _activation_mask_stat(policy: Any, ref: Mapping[str, Array], batch: Mapping[str, Array], n: int) -> Array:
    """[R, T] in [0, 1]: the reference's hidden-state norm at the position predicting token t,
    min-max normalised over each row's completion tokens (no gradient)."""
    h = jax.lax.stop_gradient(ref["hidden"]).astype(jnp.float32)
    a = _shift_right(jnp.sqrt(jnp.mean(h * h, axis=-1)))
    valid = batch["loss_mask"] > 0
    lo = jnp.min(jnp.where(valid, a, jnp.inf), axis=-1, keepdims=True)
    hi = jnp.max(jnp.where(valid, a, -jnp.inf), axis=-1, keepdims=True)
    m = (a - lo) / jnp.maximum(hi - lo, 1e-6)
    return jnp.where(valid, jnp.clip(m, 0.0, 1.0), 0.0)


_STATS = {"wpo": _wpo_stat, "token_kl": _token_kl_stat, "activation_mask": _activation_mask_stat}


def _transform(path: str) -> Callable[..., Array]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass
class _Context:
    """What the providers read: the step spec, the batch and the two forwards' outputs."""

    spec: StepSpec
    batch: Mapping[str, Array]
    outputs: dict[str, Mapping[str, Array] | None]
    state: Any
    n: int
    heads: Callable[[str, Array], Array] | None = None  # the policy's aux classifiers on features
    _lengths: Array | None = None
    _stats: dict[str, Array] = dataclasses.field(default_factory=dict)

    def part(self, values: Array, which: str) -> Array:
        """Sequences of a part: ``[B]`` halves, or ``[B, K]`` candidates of listwise batches."""
        b = self.spec.batch_size
        if self.spec.kind == "listwise":
            return values[: self.n].reshape(self.n // b, b, *values.shape[1:]).swapaxes(0, 1)
        return _rows(values, which, b)

    def lengths(self) -> Array:
        if self._lengths is None:
            self._lengths = logprobs.sequence_lengths(
                self.batch["loss_mask"], self.batch["example_ids"], self.n
            )
        return self._lengths

    def forward(self, model: str) -> Mapping[str, Array]:
        out = self.outputs[model]
        if out is None:
            raise ValueError(f"this input needs the {model} forward, which this step does not run")
        return out

    def stat(self, name: str) -> Array:
        if name not in self._stats:
            self._stats[name] = _STATS[name](self.outputs["policy"], self.outputs["ref"], self.batch, self.n)
        return self._stats[name]


def _from_sequence(name: str, p: inputs_table.Provider, ctx: _Context) -> Array:
    if p.model == "ref" and ctx.outputs["ref"] is None and name in ctx.batch:
        return ctx.batch[name]  # the reference cache's per-sequence sums
    return ctx.part(ctx.forward(p.model)["seq"], p.part)


def _from_prompt(name: str, p: inputs_table.Provider, ctx: _Context) -> Array:
    return ctx.part(ctx.forward(p.model)["prompt_seq"], p.part)


def _from_length(name: str, p: inputs_table.Provider, ctx: _Context) -> Array:
    if ctx.spec.kind in ("sft", "unpaired") and jnp.ndim(ctx.batch.get("lengths", jnp.zeros((0, 0)))) == 1:
        return ctx.batch["lengths"]  # the data layer's own count of each example's completion
    return ctx.part(ctx.lengths(), p.part)


def _rows(values: Array, which: str, b: int) -> Array:
    """Part ``which`` (:data:`PARTS`) of per-sequence values, or of the rows of a padded batch
    (row r holds sequence r)."""
    start = PARTS.index(which) * b
    return values[start : start + b]


def _from_token(name: str, p: inputs_table.Provider, ctx: _Context) -> Array:
    return _rows(ctx.forward(p.model)["tok"], p.part, ctx.spec.batch_size)


def _from_mask(name: str, p: inputs_table.Provider, ctx: _Context) -> Array:
    return _rows(ctx.batch["loss_mask"].astype(jnp.float32), p.part, ctx.spec.batch_size)


def _from_distribution(name: str, p: inputs_table.Provider, ctx: _Context) -> Array:
    values = ctx.stat(p.stat)
    if p.per_token:
        return _rows(values, p.part, ctx.spec.batch_size)
    return ctx.part(values, p.part)


def _from_head(name: str, p: inputs_table.Provider, ctx: _Context) -> Array:
    """The policy's head ``p.head`` on the ``p.model`` forward's hidden states: per token, a mask in
    [0, 1] (sigmoid of its one logit at the state that predicts the token, as the token's log-prob;
    0 off the completion); else the logits of mean completion states."""
    if ctx.heads is None:
        raise ValueError(f"input {name!r} needs the policy's aux heads, which this call was not given")
    hidden, b = ctx.forward(p.model)["hidden"], ctx.spec.batch_size
    if p.per_token:
        mask = _rows(ctx.batch["loss_mask"].astype(jnp.float32), p.part, b)
        logits = ctx.heads(p.head, _rows(hidden, p.part, b))[..., 0]
        return _shift_right(jax.nn.sigmoid(logits)) * mask
    pooled = mean_completion_state(hidden, ctx.batch["loss_mask"], ctx.batch["example_ids"], ctx.n)
    logits = ctx.heads(p.head, pooled)
    return jnp.stack([_rows(logits, part, b) for part in p.parts], axis=1)


def _from_column(name: str, p: inputs_table.Provider, ctx: _Context) -> Array:
    if p.column not in ctx.batch:
        raise ValueError(
            f"loss {ctx.spec.loss!r} reads input {name!r} from the data column {p.column!r}, which these "
            f"batches do not carry (give it on every row; batch keys: {sorted(ctx.batch)})"
        )
    value = ctx.batch[p.column]
    if p.rank == 2 and jnp.ndim(value) == 1:
        value = value[:, None]  # one source
    if p.transform:
        hyper = dict(ctx.spec.provider_hyperparameters)
        value = _transform(p.transform)(value, **{k: hyper[k] for k, _ in p.hyper})
    return value


def _from_state(name: str, p: inputs_table.Provider, ctx: _Context) -> Array:
    return ctx.state


# One function per source of alignjax.losses.providers (tests check every source has one).
SOURCES: dict[str, Callable[[str, inputs_table.Provider, _Context], Any]] = {
    "sequence": _from_sequence,
    "prompt": _from_prompt,
    "length": _from_length,
    "token": _from_token,
    "mask": _from_mask,
    "distribution": _from_distribution,
    "head": _from_head,
    "column": _from_column,
    "state": _from_state,
}


def _optional_available(name: str, ctx: _Context) -> bool:
    """An optional input is passed when its provider exists for this kind (a column: when present)."""
    p = inputs_table.PROVIDERS.get(name)
    if p is None or ctx.spec.kind not in p.kinds:
        return False
    return p.source != "column" or p.column in ctx.batch


def loss_inputs(
    spec: StepSpec,
    batch: Mapping[str, Array],
    policy: Mapping[str, Array],
    ref: Mapping[str, Array] | None,
    state: Any = None,
    heads: Callable[[str, Array], Array] | None = None,
) -> dict[str, Array]:
    """The arrays the step's losses take (required ones, and optional ones that have a provider).

    ``policy`` / ``ref``: forward outputs, ``seq`` [N] summed and ``tok`` [R, T] masked token
    log-probs, plus ``logits`` / ``hidden`` where a distribution statistic or a head needs them;
    ``heads(name, features)``: the policy's aux classifier ``name`` (``Model.aux_logits`` with the
    policy's params, so a head on the reference's states trains as the policy's).
    """
    ctx = _Context(spec, batch, {"policy": policy, "ref": ref}, state, spec.sequences_in(batch), heads)
    names = list(spec.required)
    names += [o for s in spec.specs for o in s.optional if o not in names and _optional_available(o, ctx)]
    out = {}
    for name in names:
        p = inputs_table.PROVIDERS[name]
        out[name] = SOURCES[p.source](name, p, ctx)
    return out


def _forward_needs(spec: StepSpec) -> dict[str, set[str]]:
    needs: dict[str, set[str]] = {"policy": set(), "ref": set()}
    for name in spec.required:
        p = inputs_table.PROVIDERS[name]
        if p.source == "distribution":
            for model, what in _STAT_NEEDS[p.stat].items():
                needs[model].add(what)
        if p.source == "prompt":
            needs[p.model].add("prompt_seq")
        if p.source == "head":
            needs[p.model].add("hidden")
    return needs


def prompt_mask(batch: Mapping[str, Array]) -> Array:
    """1 on the prompt tokens of each sequence that something predicts: in the padded and packed
    layouts every token of a segment that is not a completion token, but its first."""
    inside = (batch["segment_ids"] > 0) & (batch["positions"] > 0)
    return (inside & (batch["loss_mask"] == 0)).astype(jnp.float32)


def _with_prompt_sums(
    model: Any, params: Any, batch: Mapping[str, Array], n: int, spec: StepSpec, rng: Array | None
) -> dict[str, Array]:
    """One forward scoring completion and prompt tokens, reduced over each mask separately."""
    completion, prompt = batch["loss_mask"].astype(jnp.float32), prompt_mask(batch)
    _, tok = logprobs.batch_sequence_logps(
        model, params, dict(batch, loss_mask=completion + prompt), n,
        vocab_chunk=spec.vocab_chunk, seq_chunk=spec.seq_chunk, dropout_rng=rng,
    )
    ids = batch["example_ids"]
    return {
        "seq": logprobs.sequence_logps(tok, completion, ids, n),
        "tok": tok * completion,
        "prompt_seq": logprobs.sequence_logps(tok, prompt, ids, n),
    }


def _forward(
    model: Any,
    params: Any,
    batch: Mapping[str, Array],
    n: int,
    spec: StepSpec,
    keep: set[str],
    rng: Array | None = None,
) -> dict[str, Array]:
    """``seq`` [N], ``tok`` [R, T] (masked), and the ``logits``/``hidden``/``prompt_seq`` named in
    ``keep``; ``rng``: LoRA dropout's key (the policy's training forward only)."""
    if keep == {"prompt_seq"}:
        return _with_prompt_sums(model, params, batch, n, spec, rng)
    if not keep:
        seq, tok = logprobs.batch_sequence_logps(
            model, params, batch, n, **spec.logprob_options, dropout_rng=rng
        )
        return {"seq": seq, "tok": tok}
    kwargs = {k: batch[k] for k in ("positions", "segment_ids", "branch_ids") if batch.get(k) is not None}
    if rng is not None:
        kwargs["dropout_rng"] = rng
    hidden = model.hidden(params, batch["input_ids"], **kwargs)
    logits = model.logits_from_hidden(params, hidden)
    mask = batch["loss_mask"].astype(jnp.float32)
    every = logprobs.next_token_logps(logits, batch["input_ids"])
    tok = every * mask
    out = {"seq": logprobs.sequence_logps(tok, mask, batch["example_ids"], n), "tok": tok}
    out.update({k: v for k, v in (("logits", logits), ("hidden", hidden)) if k in keep})
    if "prompt_seq" in keep:
        out["prompt_seq"] = logprobs.sequence_logps(every, prompt_mask(batch), batch["example_ids"], n)
    return out


def _input_metrics(
    inputs: Mapping[str, Array], batch: Mapping[str, Array], spec: StepSpec
) -> dict[str, Array]:
    """``inputs/<name>``: batch means of the distribution statistics, learned masks and data columns
    the losses read."""
    out = {}
    for name, value in inputs.items():
        p = inputs_table.PROVIDERS[name]
        dtype = jnp.asarray(value).dtype
        numeric = jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
        if p.source not in ("distribution", "column", "head") or not numeric:
            continue
        if p.source == "head" and not p.per_token:
            continue  # a classifier's logits: their mean says nothing
        value = jax.lax.stop_gradient(jnp.asarray(value, jnp.float32))
        if p.per_token:
            m = _rows(batch["loss_mask"].astype(jnp.float32), p.part, spec.batch_size)
            out[f"inputs/{name}"] = jnp.sum(value * m) / jnp.maximum(jnp.sum(m), 1.0)
        else:
            out[f"inputs/{name}"] = jnp.mean(value)
    return out


def _call_loss(
    name: str, hyper: tuple[tuple[str, Any], ...], inputs: Mapping[str, Array]
) -> tuple[Array, Any]:
    spec = losses.spec(name)
    args = {n: inputs[n] for n in (*spec.required, *spec.optional) if n in inputs}
    result = spec.fn(**args, **dict(hyper))
    if spec.stateful:
        return result
    return result, None


def combine_losses(spec: StepSpec, inputs: Mapping[str, Array]) -> tuple[Array, dict[str, Array], Any]:
    """``sum_i w_i mean_B(loss_i(inputs))`` over ``spec.components`` (TRL's ``loss_type`` list with
    ``loss_weights``), the ``loss/objective`` metric (and ``loss/<name>`` per term of a mix), and the
    stateful loss's new state (None if none)."""
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    new_state = None
    for name, weight, hyper in spec.components:
        per_example, state_out = _call_loss(name, hyper, inputs)
        term = jnp.mean(per_example.astype(jnp.float32))
        new_state = state_out if state_out is not None else new_state
        if len(spec.components) > 1:
            metrics[f"loss/{name}"] = term
        loss = loss + weight * term
    metrics["loss/objective"] = loss
    return loss, metrics, new_state


def _is_vector(value: Any) -> bool:
    return isinstance(value, jax.Array) and value.ndim == 1


def _replicated(values: Array, model: Any) -> Array:
    """A per-sequence vector on every device: a batch mean is then one local sum in a fixed order,
    whichever sharding the rest of the program (a frozen reference's forward, a cached reference's
    inputs) would have given it, so comparable runs report bitwise-equal losses and metrics."""
    mesh = getattr(model, "mesh", None)
    if mesh is None:
        return values

    return jax.lax.with_sharding_constraint(values, replicated(mesh))


def make_loss_fn(model: Any, spec: StepSpec) -> Callable[..., tuple[Array, tuple[dict[str, Array], Any]]]:
    """``loss_fn(params, ref_params, loss_state, batch) -> (loss, (metrics, new_loss_state))``."""
    needs = _forward_needs(spec)

    def loss_fn(params: Any, ref_params: Any, loss_state: Any, batch: Mapping[str, Array]):
        n = spec.sequences_in(batch)
        policy = _forward(model, params, batch, n, spec, needs["policy"], batch.get(DROPOUT_KEY))
        ref = None
        if spec.reference == "model":
            ref_params = lora.reference_params(params, ref_params)  # LoRA: the base, adapters off
            ref = jax.lax.stop_gradient(_forward(model, ref_params, batch, n, spec, needs["ref"]))
        policy = dict(policy, seq=_replicated(policy["seq"], model))
        if ref is not None:
            ref = dict(ref, seq=_replicated(ref["seq"], model))
        heads = lambda name, features: model.aux_logits(params, name, features)  # noqa: E731
        inputs = loss_inputs(spec, batch, policy, ref, loss_state, heads)
        inputs = {k: _replicated(v, model) if _is_vector(v) else v for k, v in inputs.items()}
        loss, metrics, new_state = combine_losses(spec, inputs)
        metrics.update(_input_metrics(inputs, batch, spec))
        # RPO-style modifier: + w * mean token NLL of the chosen (first) completions.
        b = spec.batch_size
        lengths = logprobs.sequence_lengths(batch["loss_mask"], batch["example_ids"], n)
        chosen_logps = policy["seq"][:b]
        nll = jnp.mean(-chosen_logps / jnp.maximum(lengths[:b], 1.0))
        metrics["nll/chosen"] = nll
        loss = loss + spec.nll_weight * nll
        metrics["loss"] = loss
        if spec.kind in PAIRED:
            ref_seq = ref["seq"] if ref is not None else None
            ref_w = ref_l = None
            if ref_seq is not None:
                ref_w, ref_l = ref_seq[:b], ref_seq[b : 2 * b]
            elif spec.reference == "batch":
                ref_w, ref_l = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            # TRL's metrics; rewards use R = 0 when the step runs reference-free.
            metrics.update(
                preference_metrics(chosen_logps, policy["seq"][b : 2 * b], ref_w, ref_l, beta=spec.beta)
            )
        metrics["logps/chosen"] = jnp.mean(chosen_logps)
        return loss, (metrics, new_state)

    return loss_fn


# Metric key of the step's finiteness check: a bit per quantity found non-finite (0 = applied).
NONFINITE = "nonfinite"
NONFINITE_BITS = (("loss", 1), ("gradient norm", 2), ("updated parameters", 4))


def all_finite(tree: Any) -> Array:
    """Whether every element of every leaf of ``tree`` is finite (a scalar bool)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def nonfinite_code(loss: Array, grad_norm: Array, new_params: Any) -> Array:
    """``NONFINITE_BITS`` of what is not finite after a step, as a float32 scalar (0 = all finite)."""
    flags = (jnp.isfinite(loss), jnp.isfinite(grad_norm), all_finite(new_params))
    return sum(jnp.where(ok, 0.0, float(bit)) for ok, (_, bit) in zip(flags, NONFINITE_BITS)).astype(
        jnp.float32
    )


def nonfinite_causes(code: float) -> list[str]:
    """The names of the quantities a :data:`NONFINITE` code marks as non-finite."""
    return [name for name, bit in NONFINITE_BITS if int(code) & bit]


def make_train_step(
    model: Any,
    spec: StepSpec,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    sync_every: int = 0,
    sync_alpha: float = 1.0,
    loss_fn: Callable[..., Any] | None = None,
) -> Callable[[State, Mapping[str, Array]], tuple[State, dict[str, Array]]]:
    """``step(state, batch) -> (state, metrics)``; ``batch`` leaves are ``[k, ...]`` micro-batches.

    ``state``: ``params``, ``opt_state``, ``step`` (int32 scalar), ``rng``, and where used
    ``ref_params`` and ``loss_state``. With ``sync_every > 0`` the reference is EMA-updated after
    every ``sync_every``-th optimiser step. ``loss_fn`` (default :func:`make_loss_fn`) has the
    signature ``loss_fn(params, ref_params, loss_state, batch) -> (loss, (metrics, new_loss_state))``;
    other objectives (reward models) pass their own and reuse everything else.

    A step whose loss, gradient norm or updated parameters are not finite is not applied: the
    returned state is the input state and ``metrics[NONFINITE]`` says what was not finite.
    """
    dropout = bool(getattr(lora.model_lora(model), "dropout", 0.0))
    if dropout and loss_fn is not None:
        raise ValueError(
            "config.model.lora.dropout > 0: LoRA dropout is applied by the preference step only; "
            "this job's objective trains without it (set it to 0)"
        )
    loss_fn = make_loss_fn(model, spec) if loss_fn is None else loss_fn
    # Only the trainable params are differentiated and updated: with LoRA the adapters (and a head);
    # the frozen base enters as a constant (alignjax.models.lora.partition).
    grad_fn = jax.value_and_grad(lambda p, frozen, *a: loss_fn(lora.combine(p, frozen), *a), has_aux=True)

    def step(state: State, batch: Mapping[str, Array]) -> tuple[State, dict[str, Array]]:
        params, frozen = lora.partition(state["params"])
        ref_params = state.get("ref_params")
        k = jax.tree.leaves(batch)[0].shape[0]

        def micro(carry, micro_batch):
            grads_sum, loss_state = carry
            if dropout:  # LoRA dropout: one key per optimiser step and micro-batch, from the state's rng
                micro_batch, key = micro_batch
                micro_batch = dict(micro_batch, **{DROPOUT_KEY: key})
            (_, (metrics, new_loss_state)), grads = grad_fn(
                params, frozen, ref_params, loss_state, micro_batch
            )
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
            return (grads_sum, new_loss_state), metrics

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        keys = jax.random.split(jax.random.fold_in(state["rng"], state["step"]), k) if dropout else None
        xs = (batch, keys) if dropout else batch
        (grads, loss_state), metrics = jax.lax.scan(micro, (zeros, state.get("loss_state")), xs)
        grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, params)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        if spec.nan_at_step >= 0:  # testing aid: a poisoned update under a finite loss
            poison = jnp.where(state["step"] + 1 == spec.nan_at_step, jnp.nan, 0.0)
            grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(
            state, params=lora.combine(new_params, frozen), opt_state=opt_state, step=state["step"] + 1
        )
        if loss_state is not None:
            new_state["loss_state"] = loss_state
        if ref_params is not None and sync_every > 0:
            due = (new_state["step"] % sync_every) == 0
            alpha = jnp.where(due, jnp.float32(sync_alpha), jnp.float32(0.0))
            new_state["ref_params"] = ema_update(ref_params, new_state["params"], alpha)
        metrics[NONFINITE] = nonfinite_code(metrics["loss"], metrics["grad_norm"], new_params)
        applied = metrics[NONFINITE] == 0
        # A non-finite step leaves the state as it was, so no checkpoint can ever hold one.
        new_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old), new_state, state)
        return new_state, metrics

    return step


def make_eval_fn(model: Any, spec: StepSpec) -> Callable[[Any, Any, Mapping[str, Array]], dict[str, Array]]:
    """``eval(params, ref_params, batch) -> {chosen_logps, rejected_logps, ref_*, chosen_lengths, ...}``
    for one (un-stacked) sequence batch of held-out examples: the per-sequence values evaluation needs."""

    def forward(params: Any, batch: Mapping[str, Array]) -> tuple[Array, Array]:
        return logprobs.batch_sequence_logps(
            model,
            params,
            batch,
            spec.sequences_in(batch),
            **spec.logprob_options,
        )

    def evaluate(params: Any, ref_params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
        policy = forward(params, batch)
        ref = None
        if spec.reference == "model":
            ref = forward(lora.reference_params(params, ref_params), batch)
        b = spec.batch_size
        lengths = logprobs.sequence_lengths(
            batch["loss_mask"], batch["example_ids"], spec.sequences_in(batch)
        )
        out = {"chosen_logps": policy[0][:b], "chosen_lengths": lengths[:b]}
        if spec.kind in PAIRED:
            out.update(rejected_logps=policy[0][b : 2 * b], rejected_lengths=lengths[b : 2 * b])
        if ref is not None and spec.kind in PAIRED:
            out.update(ref_chosen_logps=ref[0][:b], ref_rejected_logps=ref[0][b : 2 * b])
        elif "ref_chosen_logps" in batch and spec.kind in PAIRED:
            out.update(
                ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"]
            )
        return out

    return evaluate
