"""The preference / SFT train step: a sequence batch in, exactly the loss's declared inputs out.

The step never branches on the loss. ``alignjax.losses.spec(name).required`` lists the arrays the
loss takes; :func:`loss_inputs` builds each from the policy (and, when a ``ref_*`` name is listed,
reference) log-probs of the batch, or takes it from the batch itself (per-example arrays such as
``labels`` and cached ``ref_chosen_logps``). Sequences ``0..B-1`` of a batch are the chosen (or
single, or desirable/undesirable) completions, ``B..2B-1`` the rejected (or KTO's mismatched KL)
completions; SFT batches hold only ``0..B-1``.

Batches enter the step stacked as ``[k, ...]``: ``k = config.optim.grad_accum_steps`` micro-batches,
scanned with gradients summed and divided by ``k``, so that one optimiser update sees the mean of
the micro-batch losses, which is the full-batch mean loss when micro-batches have equal size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import alignjax.losses as losses
from alignjax import logprobs
from alignjax.data import schema
from alignjax.losses.metrics import preference_metrics

Array = jax.Array
State = dict[str, Any]

KINDS = ("pairwise", "step", "sft", "unpaired")  # alignjax.data kinds this step trains on
# Kinds whose batches hold two sequences an example (chosen, rejected); "step" adds visit counts.
PAIRED = ("pairwise", "step")
# Kinds laid out as 2B sequences: pairs, and unpaired batches with KTO's mismatched (KL) sequences.
TWO_SEQUENCE = (*PAIRED, "unpaired")
# Names computed from model outputs (everything else comes from the batch).
_SEQ = {
    "chosen_logps": ("policy", "first"),
    "rejected_logps": ("policy", "second"),
    "ref_chosen_logps": ("ref", "first"),
    "ref_rejected_logps": ("ref", "second"),
    "logps": ("policy", "first"),
    "kl_logps": ("policy", "second"),
    "ref_logps": ("ref", "first"),
    "ref_kl_logps": ("ref", "second"),
}
_LEN = {"chosen_lengths": "first", "rejected_lengths": "second", "lengths": "first"}
_TOK = {
    "chosen_token_logps": ("policy", "first"),
    "rejected_token_logps": ("policy", "second"),
    "ref_chosen_token_logps": ("ref", "first"),
    "ref_rejected_token_logps": ("ref", "second"),
}
_MASK = {"chosen_mask": "first", "rejected_mask": "second"}
# Reference values a precomputed cache can supply (per-sequence sums only).
CACHEABLE = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")
# Every loss input this step can supply: computed from the forwards, or a per-example column the
# data layer puts in the batch. A loss needing anything else is refused before compilation.
PROVIDED = frozenset(
    {*_SEQ, *_LEN, *_TOK, *_MASK, "labels", "state", *schema.BATCH_FLOAT_FIELDS, *schema.INT_EXTRAS}
)
# Families trained by their own job, not by the preference step.
OWN_JOB = {"reward": "experiments/reward_model.py", "diffusion": "experiments/repro_diffusion2d.py"}


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of what a step computes (hashable, closed over by jit).

    ``reference``: "model" (run a reference forward with ``state["ref_params"]``), "batch" (the
    reference log-probs arrive in the batch from the on-disk cache) or "none" (reference-free).
    """

    loss: str
    hyperparameters: tuple[tuple[str, Any], ...]
    kind: str
    batch_size: int  # examples per micro-batch (global)
    reference: str
    nll_weight: float = 0.0
    vocab_chunk: int | None = None
    seq_chunk: int | None = None
    nan_at_step: int = -1

    @property
    def num_sequences(self) -> int:
        return 2 * self.batch_size if self.kind in TWO_SEQUENCE else self.batch_size

    @property
    def required(self) -> tuple[str, ...]:
        return losses.spec(self.loss).required

    @property
    def stateful(self) -> bool:
        return losses.spec(self.loss).stateful

    @property
    def needs_reference(self) -> bool:
        return losses.spec(self.loss).needs_reference


def make_step_spec(config: Any, batch_size: int, reference: str) -> StepSpec:
    """Builds the StepSpec from ``config.loss`` / ``config.data`` and checks it can be satisfied.

    ``config.loss`` holds ``name``, ``nll_weight`` and the loss's keyword-only hyperparameters; a
    key the loss does not take is an error naming it.
    """
    spec = losses.spec(config.loss.name)
    check_inputs_provided(spec)
    hyper = {}
    for key, value in config.loss.items():
        if key in ("name", "nll_weight"):
            continue
        if key not in spec.hyperparameters:
            raise ValueError(
                f"config.loss.{key}: loss {config.loss.name!r} has no hyperparameter {key!r}; "
                f"its hyperparameters: {sorted(spec.hyperparameters)}"
            )
        hyper[key] = value
    kind = config.data.kind
    if kind not in KINDS:
        raise ValueError(f"config.data.kind={kind!r}; choose one of {list(KINDS)}")
    step_spec = StepSpec(
        loss=spec.name,
        hyperparameters=tuple(sorted(hyper.items())),
        kind=kind,
        batch_size=int(batch_size),
        reference=reference if spec.needs_reference else "none",
        nll_weight=float(config.loss.nll_weight),
        vocab_chunk=config.get("train", {}).get("vocab_chunk") or None,
        seq_chunk=config.get("train", {}).get("seq_chunk") or None,
        nan_at_step=int(config.get("train", {}).get("nan_at_step", -1)),
    )
    if spec.needs_reference and reference == "none":
        raise ValueError(
            f"loss {spec.name!r} needs reference log-probs "
            f"({[n for n in spec.required if n.startswith('ref_')]}) "
            "but config.reference.kind='none'; use frozen, cache or ema"
        )
    if reference == "batch":
        bad = [n for n in spec.required if n.startswith("ref_") and n not in CACHEABLE]
        if bad:
            raise ValueError(
                f"config.reference.kind='cache' holds per-sequence sums only; loss "
                f"{spec.name!r} needs {bad}: use kind=frozen"
            )
    return step_spec


def check_inputs_provided(spec: losses.LossSpec) -> None:
    """Refuses, before any compilation, a loss whose array inputs this step cannot supply."""
    missing = [n for n in spec.required if n not in PROVIDED]
    if not missing:
        return
    where = (
        f"it is trained by {OWN_JOB[spec.family]}"
        if spec.family in OWN_JOB
        else "its provider (a model output or a data column) is not built yet"
    )
    raise ValueError(
        f"config.loss.name={spec.name!r}: the preference step cannot supply its input(s) {missing}; {where}"
    )


def _half(values: Array, which: str, b: int) -> Array:
    return values[:b] if which == "first" else values[b : 2 * b]


def loss_inputs(
    spec: StepSpec,
    batch: Mapping[str, Array],
    policy: tuple[Array, Array],
    ref: tuple[Array, Array] | None,
    state: Any = None,
) -> dict[str, Array]:
    """The arrays named in ``losses.spec(spec.loss).required`` (plus ``chosen_*`` for metrics).

    ``policy`` / ``ref`` are ``(sequence_logps [N], token_logps [R, T])`` from
    :func:`alignjax.logprobs.batch_sequence_logps`. Token-level inputs assume the padded layout,
    where row r holds sequence r.
    """
    b = spec.batch_size
    sources = {"policy": policy, "ref": ref}
    names = set(spec.required) | {"chosen_logps", "chosen_lengths"}
    if spec.kind in PAIRED:
        names |= {"rejected_logps", "rejected_lengths"}
    if ref is not None and spec.kind in PAIRED:
        names |= {"ref_chosen_logps", "ref_rejected_logps"}
    lengths = None
    out: dict[str, Array] = {}
    for name in sorted(names):
        if name == "labels" and "label" in batch:
            out[name] = batch["label"]
        elif name == "chosen_lengths" and "lengths" in batch and spec.kind not in PAIRED:
            out[name] = batch["lengths"]
        elif name in batch and (name.startswith("ref_") or name not in _SEQ):
            out[name] = batch[name]  # per-example arrays and cached reference log-probs
        elif name in _SEQ:
            source, which = _SEQ[name]
            if sources[source] is None:
                raise ValueError(f"{name} needs the reference forward, which this step does not run")
            out[name] = _half(sources[source][0], which, b)
        elif name in _LEN:
            if lengths is None:
                lengths = logprobs.sequence_lengths(
                    batch["loss_mask"], batch["example_ids"], spec.num_sequences
                )
            out[name] = _half(lengths, _LEN[name], b)
        elif name in _TOK:
            source, which = _TOK[name]
            out[name] = _half(sources[source][1], which, b)
        elif name in _MASK:
            out[name] = _half(batch["loss_mask"].astype(jnp.float32), _MASK[name], b)
        elif name == "state":
            out[name] = state
        else:
            raise ValueError(
                f"loss {spec.loss!r} needs the array {name!r}, which the batch does not carry "
                f"(batch keys: {sorted(batch)})"
            )
    return out


def _call_loss(spec: StepSpec, inputs: Mapping[str, Array]) -> tuple[Array, Any]:
    fn = losses.get(spec.loss)
    args = {name: inputs[name] for name in spec.required}
    result = fn(**args, **dict(spec.hyperparameters))
    if spec.stateful:
        return result
    return result, None


def make_loss_fn(model: Any, spec: StepSpec) -> Callable[..., tuple[Array, tuple[dict[str, Array], Any]]]:
    """``loss_fn(params, ref_params, loss_state, batch) -> (loss, (metrics, new_loss_state))``."""

    def forward(params: Any, batch: Mapping[str, Array]) -> tuple[Array, Array]:
        return logprobs.batch_sequence_logps(
            model, params, batch, spec.num_sequences, vocab_chunk=spec.vocab_chunk, seq_chunk=spec.seq_chunk
        )

    def loss_fn(params: Any, ref_params: Any, loss_state: Any, batch: Mapping[str, Array]):
        policy = forward(params, batch)
        ref = None
        if spec.reference == "model":
            ref = jax.lax.stop_gradient(forward(ref_params, batch))
        inputs = loss_inputs(spec, batch, policy, ref, loss_state)
        per_example, new_state = _call_loss(spec, inputs)
        loss = jnp.mean(per_example.astype(jnp.float32))
        metrics = {"loss/objective": loss}
        # RPO / CPO-style modifier: + w * mean token NLL of the chosen completions.
        lengths = jnp.maximum(inputs["chosen_lengths"].astype(jnp.float32), 1.0)
        nll = jnp.mean(-inputs["chosen_logps"] / lengths)
        metrics["nll/chosen"] = nll
        loss = loss + spec.nll_weight * nll
        metrics["loss"] = loss
        if spec.kind in PAIRED:
            beta = float(dict(spec.hyperparameters).get("beta", 1.0))
            # TRL's metrics; rewards use R = 0 when the step runs reference-free.
            metrics.update(
                preference_metrics(
                    inputs["chosen_logps"],
                    inputs["rejected_logps"],
                    inputs.get("ref_chosen_logps"),
                    inputs.get("ref_rejected_logps"),
                    beta=beta,
                )
            )
        metrics["logps/chosen"] = jnp.mean(inputs["chosen_logps"])
        return loss, (metrics, new_state)

    return loss_fn


def ema_update(ref_params: Any, params: Any, alpha: float | Array) -> Any:
    """TR-DPO soft update ``ref <- alpha * policy + (1 - alpha) * ref`` (alpha = 1: hard sync).

    "Learn Your Reference Model for Real Good Alignment" (Gorbatovski et al., arXiv:2404.09656).
    """
    return jax.tree.map(
        lambda r, p: (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)).astype(r.dtype),
        ref_params,
        params,
    )


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
    loss_fn = make_loss_fn(model, spec) if loss_fn is None else loss_fn
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: State, batch: Mapping[str, Array]) -> tuple[State, dict[str, Array]]:
        params = state["params"]
        ref_params = state.get("ref_params")
        k = jax.tree.leaves(batch)[0].shape[0]

        def micro(carry, micro_batch):
            grads_sum, loss_state = carry
            (_, (metrics, new_loss_state)), grads = grad_fn(params, ref_params, loss_state, micro_batch)
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
            return (grads_sum, new_loss_state), metrics

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, loss_state), metrics = jax.lax.scan(micro, (zeros, state.get("loss_state")), batch)
        grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, params)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        if spec.nan_at_step >= 0:  # testing aid: a poisoned update under a finite loss
            poison = jnp.where(state["step"] + 1 == spec.nan_at_step, jnp.nan, 0.0)
            grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, params=new_params, opt_state=opt_state, step=state["step"] + 1)
        if loss_state is not None:
            new_state["loss_state"] = loss_state
        if ref_params is not None and sync_every > 0:
            due = (new_state["step"] % sync_every) == 0
            alpha = jnp.where(due, jnp.float32(sync_alpha), jnp.float32(0.0))
            new_state["ref_params"] = ema_update(ref_params, new_params, alpha)
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
            model, params, batch, spec.num_sequences, vocab_chunk=spec.vocab_chunk, seq_chunk=spec.seq_chunk
        )

    def evaluate(params: Any, ref_params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
        policy = forward(params, batch)
        ref = forward(ref_params, batch) if spec.reference == "model" else None
        b = spec.batch_size
        lengths = logprobs.sequence_lengths(batch["loss_mask"], batch["example_ids"], spec.num_sequences)
        out = {"chosen_logps": policy[0][:b], "chosen_lengths": lengths[:b]}
        if spec.kind in PAIRED:
            out.update(rejected_logps=policy[0][b : 2 * b], rejected_lengths=lengths[b : 2 * b])
        if ref is not None:
            out.update(ref_chosen_logps=ref[0][:b], ref_rejected_logps=ref[0][b : 2 * b])
        elif "ref_chosen_logps" in batch:
            out.update(
                ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"]
            )
        return out

    return evaluate
