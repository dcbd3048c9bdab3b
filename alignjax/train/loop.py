"""The train loop, one function in sections (preference losses and SFT alike).

mesh -> model -> data -> abstract init (``jax.eval_shape``) -> shardings -> ``jit(init,
out_shardings)`` -> restore -> ``jit(step, donate_argnums=0)`` -> loop (metrics read one step late,
periodic evaluation, orbax checkpoints, SIGTERM = save and exit, non-finite step = not applied, stop)
-> summary.

Determinism: the data iterator, the params and the RNG are all in the checkpoint, and metrics
past the restored step are dropped from ``metrics.jsonl``, so a run killed at any step and restarted
writes the same ``metrics.jsonl`` as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import alignjax.losses as losses
from alignjax import flops, logprobs, sharding, storage
from alignjax.models import lora as lora_lib
from alignjax.train import checkpoint as ckpt
from alignjax.train import reference as reflib
from alignjax.train.metrics import MetricWriter, Throughput, plot_curves
from alignjax.train.optim import make_optimizer
from alignjax.train.step import (
    NONFINITE,
    aux_heads,
    check_aux_heads,
    check_data_columns,
    make_eval_fn,
    make_step_spec,
    make_train_step,
    nonfinite_causes,
    sequence_options,
)


class NonFiniteStep(FloatingPointError):
    """A step's loss, gradient norm or updated parameters were NaN or infinite; the step was not
    applied and the run stops, keeping its last good checkpoint."""


# Consecutive steps with a gradient norm of exactly 0 after which the run says it no longer learns.
ZERO_GRAD_STREAK = 5


# ------------------------------------------------------------------------------------------ helpers


def build_model(
    model_config: Any, mesh: Any, rules: Any, vocab_size: int = 0, aux_heads: tuple = ()
) -> tuple[Any, Any]:
    """``(model, pretrained_params or None)`` from ``config.model``.

    A preset gets ``config.model.overrides`` (``vocab_size=0`` = grow to the tokenizer's vocabulary)
    and is initialised by the train loop with ``config.seed``; a directory is loaded. ``dtype`` is the
    param (master-weight) dtype, ``compute_dtype`` that of activations and matmuls ("" = ``dtype``;
    float32 + bfloat16 is the usual mixed precision), ``remat`` the decoder layers' rematerialisation
    policy ("" = none; see ``alignjax.models.config.REMAT_POLICIES``), ``attention_kernel`` the
    training forward's attention ("" = auto: cuDNN on GPUs, splash on TPUs; ``ModelConfig``),
    ``scan_layers`` the layer layout (None = the preset's; unrolled for a directory); ``aux_heads``
    the classifiers the losses read beside the decoder (``ModelConfig.aux_heads``, fresh).
    """
    from alignjax import models

    path = model_config.path
    numerics = dict(
        param_dtype=model_config.dtype,
        dtype=model_config.get("compute_dtype") or model_config.dtype,
        remat=model_config.get("remat") or "none",
        attention_kernel=model_config.get("attention_kernel") or "auto",
    )
    if model_config.get("scan_layers") is not None:
        numerics["scan_layers"] = bool(model_config.get("scan_layers"))
    numerics["lora"] = lora_lib.from_config(model_config.get("lora"))  # rank 0: None, no adapters
    numerics["aux_heads"] = tuple(aux_heads)
    if path in models.PRESETS:
        overrides = {
            k: v for k, v in dict(model_config.get("overrides", {})).items() if v not in (0, "", None)
        }
        base = models.PRESETS[path]
        if not overrides.get("vocab_size") and vocab_size > base.vocab_size:
            overrides["vocab_size"] = vocab_size
        cfg = base.replace(**numerics, **overrides)
        check_vocab_fits(vocab_size, cfg.vocab_size, "config.model.overrides.vocab_size")
        return models.Model(cfg, mesh=mesh, rules=rules), None
    model = models.from_pretrained(
        path,
        dtype=numerics["param_dtype"],
        compute_dtype=numerics["dtype"],
        remat=numerics["remat"],
        attention_kernel=numerics["attention_kernel"],
        scan_layers=numerics.get("scan_layers"),
        lora=numerics["lora"],
        aux_heads=numerics["aux_heads"],
        mesh=mesh,
        rules=rules,
    )
    check_vocab_fits(vocab_size, model.config.vocab_size, f"config.model.path={path}")
    return model, model.params


def check_vocab_fits(tokenizer_vocab: int, model_vocab: int, where: str) -> None:
    """Token ids past the embedding would read garbage rows (NaN at step 1): refused up front."""
    if tokenizer_vocab > model_vocab:
        raise ValueError(
            f"the tokenizer (config.data.tokenizer) has {tokenizer_vocab} tokens but the model's "
            f"embedding has {model_vocab} rows ({where}): use the model's own tokenizer or a model "
            "with a vocabulary at least as large"
        )


def data_iterator(
    config: Any,
    source: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    seed: int | None = None,
    split: str = "all",
    batch_key: str = "config.data.batch_size",
    workdir: Any = None,
) -> Any:
    """The data pipeline for ``source`` with fixed-length batches (one compiled shape); ``split``
    (``all``/``train``/``eval``) with ``config.data.eval_fraction`` holds rows out for evaluation.
    ``batch_key`` is the config key a too-small data set is reported against."""
    from alignjax.data import make_preference_batches
    from alignjax.data.pipeline import TooFewExamples, resolve_cache_dir, tokenize_options

    if not source:
        raise ValueError("config.data.source is empty: give a dataset (e.g. synthetic:arithmetic_dpo:train)")
    layout = config.data.layout
    extra: dict[str, Any] = {"buckets": (config.data.max_length * (2 if layout == "shared_prompt" else 1),)}
    if layout == "packed":
        extra = {"pack_length": config.data.max_length * 2, "pack_rows": batch_size}
    if "loss" in config and config.get("job", "train") == "train":
        extra.update(sequence_options(config))
    try:
        data, stats = make_preference_batches(
            source,
            config.data.tokenizer,
            kind=config.data.kind,
            layout=layout,
            batch_size=batch_size,
            max_length=config.data.max_length,
            seed=config.seed if seed is None else seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            on_bad_row=config.data.on_bad_row,
            split=split,
            eval_fraction=float(config.data.get("eval_fraction", 0.0)),
            pad_to_multiple_of=config.data.get("pad_to_multiple_of", 0) or None,
            **tokenize_options(config.data),
            cache_dir=resolve_cache_dir(config.data.get("cache_dir", ""), workdir),
            **extra,
        )
    except TooFewExamples as err:
        where = f"{source} ({split} split)" if split != "all" else source
        message = f"{batch_key}={err.batch_size}: {where} has only {err.count} usable examples"
        raise ValueError(message) from None
    return data, stats


def check_batch_divides_mesh(config: Any, mesh: Any, micro_size: int) -> None:
    """Each step's pairs and each evaluation batch split evenly over the mesh's batch axes; said
    before compile, with the keys to change."""
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    checks = [("config.data.batch_size / config.optim.grad_accum_steps", micro_size)]
    if config.data.eval_source or config.data.get("eval_fraction", 0.0):
        checks.append(("config.data.eval_batch_size", int(config.data.eval_batch_size)))
    for key, size in checks:
        if size % shards:
            raise ValueError(
                f"{key} = {size} examples must be a multiple of the mesh's data-parallel size "
                f"{shards} (mesh.data x mesh.fsdp = {dict(mesh.shape)})"
            )


def _tokens(host: Mapping[str, np.ndarray]) -> int:
    return int(np.sum(np.asarray(host["segment_ids"]) > 0))


def evaluate(
    eval_fn: Any, params: Any, ref_params: Any, batches: list[dict[str, jax.Array]], beta: float
) -> dict[str, float]:
    """Held-out metrics: ranking accuracy, reward accuracy and the idealised bound (pairs), mean NLL."""
    from alignjax.eval import ranking

    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for k, v in eval_fn(params, ref_params, batch).items():
            parts.setdefault(k, []).append(
                np.asarray(jax.experimental.multihost_utils.process_allgather(v, tiled=True))
            )
    vals = {k: np.concatenate(v) for k, v in parts.items()}
    out = {"eval/nll_chosen": float(np.mean(-vals["chosen_logps"] / np.maximum(vals["chosen_lengths"], 1)))}
    if "rejected_logps" in vals:
        out["eval/ranking_accuracy"] = float(
            ranking.ranking_accuracy(vals["chosen_logps"], vals["rejected_logps"])
        )
        if "ref_chosen_logps" in vals:
            report = ranking.ranking_report(
                vals["chosen_logps"],
                vals["rejected_logps"],
                vals["ref_chosen_logps"],
                vals["ref_rejected_logps"],
            )
            out.update(report)
            out[f"eval/idealized_ranking_accuracy/beta={beta:g}"] = float(
                ranking.idealized_ranking_accuracy(
                    vals["ref_chosen_logps"], vals["ref_rejected_logps"], beta=beta
                )
            )
        else:
            out["eval/reward_accuracy"] = float(
                ranking.reward_accuracy(vals["chosen_logps"], vals["rejected_logps"])
            )
    return out


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the loop takes from a training objective; preference/SFT training is :data:`PREFERENCE`.

    ``make_step_spec(config, micro_batch_size, reference_mode) -> spec``,
    ``make_train_step(model, spec, tx, schedule, *, sync_every, sync_alpha) -> step``,
    ``make_eval_fn(model, spec) -> eval_fn``, ``evaluate(eval_fn, params, ref_params, batches, beta)``
    and ``model_flops(model, spec, host_batch) -> float`` (the ``perf/*`` accounting).
    Reward models (:mod:`alignjax.reward.train`) supply their own and reuse the rest of the loop.
    ``prepare_batch(state, micro_batches, step) -> micro_batches`` (optional): online objectives
    (:mod:`alignjax.online.train`) turn each step's data batches (prompts) into rollouts of the
    current policy before the step runs.
    """

    make_step_spec: Any
    make_train_step: Any
    make_eval_fn: Any
    evaluate: Any
    model_flops: Any
    prepare_batch: Any = None


def model_flops(model: Any, spec: Any, host: Mapping[str, np.ndarray]) -> float:
    """Model FLOPs of one preference/SFT micro-batch: the policy's forward + backward through the
    language-model head, and the reference forward when the step runs one (``alignjax.flops``)."""
    return flops.step_flops(model.config, host, reference_forward=spec.reference == "model")["total"]


PREFERENCE = Objective(make_step_spec, make_train_step, make_eval_fn, evaluate, model_flops)


class _Stop:
    """SIGTERM / SIGINT (Ctrl-C) flag: the loop saves a checkpoint at the next step boundary and
    exits cleanly, resumable, instead of dying mid-step with nothing saved."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


# ------------------------------------------------------------------------------------------ the loop


def nonfinite_message(
    step: int, causes: list[str], values: Mapping[str, float], last_saved: int | None, directory: Any
) -> str:
    """Why the run stopped at ``step`` and which checkpoint to resume from."""
    finite_loss = "" if "loss" in causes else f" (its loss, {values['loss']:.6g}, was finite)"
    advice = "lower config.optim.learning_rate or check the data"
    kept = (
        f"The last good checkpoint (step {last_saved}) is kept in {directory}; {advice}, then rerun "
        "to resume from it."
        if last_saved
        else f"No checkpoint was saved before it; {advice}."
    )
    return f"step {step} was not applied: non-finite {' and '.join(causes)}{finite_loss}; stopping. {kept}"


class ZeroGradients:
    """Counts steps whose gradient norm is exactly 0 and says once per streak of
    :data:`ZERO_GRAD_STREAK` that the model no longer learns (a saturated or detached model)."""

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate
        self.total, self.streak = 0, 0

    def add(self, step: int, grad_norm: float) -> None:
        self.streak = self.streak + 1 if grad_norm == 0.0 else 0
        self.total += grad_norm == 0.0
        if self.streak == ZERO_GRAD_STREAK and jax.process_index() == 0:
            print(
                f"warning: grad_norm has been exactly 0 for {ZERO_GRAD_STREAK} steps (steps "
                f"{step - ZERO_GRAD_STREAK + 1}-{step}): the model no longer learns (saturated: is "
                f"config.optim.learning_rate={self.learning_rate:g} too large?)",
                flush=True,
            )

    def summary(self) -> dict[str, int]:
        return {"train/zero_grad_steps": self.total} if self.total else {}


def run_train(
    config: Any,
    workdir: storage.PathLike,
    *,
    init_params: Any = None,
    ref_params: Any = None,
    model: Any = None,
    objective: Objective = PREFERENCE,
) -> dict[str, Any]:
    """Trains per ``config`` in ``workdir`` (resuming from its last checkpoint) and returns the summary.

    ``init_params`` / ``ref_params`` (already on the mesh, optional) start the policy / reference from
    given params, e.g. the SFT stage of the quickstart; ``model`` reuses a built model; ``objective``
    replaces the preference step (see :class:`Objective`).
    """
    t_start = time.time()
    root = storage.path(workdir)  # a local directory or gs://...; every file below goes through it
    root.mkdir(parents=True, exist_ok=True)
    # ---- mesh
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.rules_from_config(config.rules or None)
    k = int(config.optim.grad_accum_steps)
    if config.data.batch_size % k:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} must be divisible by "
            f"config.optim.grad_accum_steps={k}"
        )
    micro_size = config.data.batch_size // k
    check_batch_divides_mesh(config, mesh, micro_size)
    num_steps = int(config.train.num_steps)

    # ---- data
    from alignjax.data.pipeline import eval_plan

    plan = eval_plan(config.data.source, config.data.eval_source, config.data.get("eval_fraction", 0.0))
    if config.data.eval_source and plan is None:
        print(
            f"data.eval_source={config.data.eval_source} is a built-in set and data.source is not: not "
            "evaluating on it (set data.eval_source or data.eval_fraction)",
            flush=True,
        )
    train_split = "train" if plan is not None and plan[1] == "eval" else "all"
    data, stats = data_iterator(config, config.data.source, micro_size, split=train_split, workdir=workdir)
    if objective is PREFERENCE:  # a data column the loss reads is checked on one batch, before any compile
        before = data.get_state()
        check_data_columns(config, next(data).keys(), config.data.source)
        data.set_state(before)
    eval_batches_host = []
    if plan is not None:
        eval_data, _ = data_iterator(
            config,
            plan[0],
            config.data.eval_batch_size,
            shuffle=False,
            num_epochs=1,
            split=plan[1],
            batch_key="config.data.eval_batch_size",
            workdir=workdir,
        )
        for host in eval_data:
            eval_batches_host.append(sharding.global_sequence_ids(host))
            if len(eval_batches_host) * config.data.eval_batch_size >= config.data.num_eval:
                break

    # ---- model and step
    ref_mode = reflib.step_reference_mode(config.reference.kind)
    spec = objective.make_step_spec(config, micro_size, ref_mode)
    heads = aux_heads(spec.required, dict(spec.provider_hyperparameters)) if objective is PREFERENCE else ()
    if model is None:
        model, pretrained = build_model(config.model, mesh, rules, data.tokenizer.vocab_size, heads)
        init_params = pretrained if init_params is None else init_params
    check_aux_heads(model, heads)
    tx, schedule = make_optimizer(config.optim, num_steps)
    keep_ref = spec.reference == "model" and (
        ref_params is not None or reflib.keeps_copy(config.reference.kind, model)
    )  # LoRA: the reference is the policy's base, no copy
    sync_every = int(config.reference.sync_every) if config.reference.kind == "ema" else 0
    loss_state0 = None
    if spec.stateful:
        loss_state0 = losses.get(spec.loss).init_state()

    # ---- abstract init -> shardings -> jit(init, out_shardings)
    param_shardings = model.shardings(mesh, rules)
    repl = sharding.replicated(mesh)

    def init(rng: jax.Array, params: Any, ref: Any) -> dict[str, Any]:
        init_rng, rng = jax.random.split(rng)
        params = model.init(init_rng) if params is None else params
        opt_state = tx.init(lora_lib.trainable_part(params))  # LoRA: the adapters' moments only
        state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32), "rng": rng}
        if keep_ref:
            ref_dtype = None if sync_every else model.config.dtype  # see reflib.stored_reference
            state["ref_params"] = reflib.stored_reference(params if ref is None else ref, ref_dtype)
        if loss_state0 is not None:
            state["loss_state"] = loss_state0
        return state

    rng0 = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init, rng0, init_params, ref_params)
    state_shardings = {
        "params": param_shardings,
        "opt_state": optax.tree_map_params(
            tx,
            lambda _, s: s,
            abstract["opt_state"],
            lora_lib.trainable_part(param_shardings),
            transform_non_params=lambda _: repl,
        ),
        "step": repl,
        "rng": repl,
    }
    if keep_ref:
        state_shardings["ref_params"] = param_shardings
    if loss_state0 is not None:
        state_shardings["loss_state"] = jax.tree.map(lambda _: repl, abstract["loss_state"])
    manifest = ckpt.shape_manifest(abstract, dataclasses.asdict(model.config))
    checkpointer = ckpt.Checkpointer(
        root / "checkpoints",
        keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoints,
    )
    writer = MetricWriter(workdir, tensorboard=config.train.tensorboard)
    # ---- restore the newest step that restores (damaged ones are moved aside; a checkpoint of
    # another model is refused before any array is read)
    restored = checkpointer.restore_latest(ckpt.abstract_with_shardings(abstract, state_shardings), manifest)
    if restored is not None:
        start, state, data_state = restored
        # A LoRA checkpoint holds the trainable state only: the frozen base is rebuilt as at the start.
        fresh = lambda: jax.jit(init, out_shardings=state_shardings)(rng0, init_params, ref_params)  # noqa: E731
        state = checkpointer.with_frozen(state, fresh)
        data.set_state(data_state)
        writer.truncate_after(start)
    else:
        start = 0
        writer.reset()
        state = jax.jit(init, out_shardings=state_shardings)(rng0, init_params, ref_params)

    # ---- reference cache (kind=cache): built once, then read into each batch
    cache = None
    if spec.reference == "batch":
        ref_model_params = init_params if ref_params is None else ref_params
        if ref_model_params is None:
            ref_model_params = jax.jit(
                lambda r: model.init(jax.random.split(r)[0]), out_shardings=param_shardings
            )(rng0)
        cache = _build_cache(config, workdir, model, spec, ref_model_params, micro_size, num_steps * k)

    train_step = jax.jit(
        objective.make_train_step(
            model, spec, tx, schedule, sync_every=sync_every, sync_alpha=float(config.reference.alpha)
        ),
        donate_argnums=(0,),
        out_shardings=(state_shardings, None),
        compiler_options=logprobs.STRICT_ROUNDING,
    )
    eval_spec = dataclasses.replace(spec, batch_size=config.data.eval_batch_size)
    eval_fn = jax.jit(objective.make_eval_fn(model, eval_spec), compiler_options=logprobs.STRICT_ROUNDING)
    eval_batches = [sharding.global_batch(mesh, h) for h in eval_batches_host]
    beta = float(dict(spec.hyperparameters).get("beta", 1.0))

    def run_eval(step: int) -> dict[str, float]:
        if not eval_batches:
            return {}
        if cache is not None:
            return {}  # held-out batches have no cached reference values
        return objective.evaluate(
            eval_fn, state["params"], state.get("ref_params", _no_copy(state["params"])), eval_batches, beta
        )

    # ---- loop
    progress = None
    if config.train.progress and jax.process_index() == 0:
        from tqdm import tqdm

        progress = tqdm(total=num_steps, initial=start, desc=f"{spec.loss}", dynamic_ncols=True)
    pending: tuple[int, Any] | None = None
    last_metrics: dict[str, float] = {}
    last_saved = start if start else None
    tokens, t_window = 0, time.time()
    speed = Throughput(
        local_devices=jax.local_device_count(),
        processes=jax.process_count(),
        peak_flops=flops.peak_flops_per_device(jax.devices()[0].device_kind),
    )
    speeds: list[dict[str, float]] = []

    zero_grads = ZeroGradients(float(config.optim.learning_rate))

    def drain(item: tuple[int, Any] | None) -> None:
        """Reads a step's metrics (one step late), stops on a non-finite step, logs."""
        nonlocal last_metrics
        if item is None:
            return
        step_no, metrics = item
        values = {key: float(v) for key, v in jax.device_get(metrics).items()}
        causes = nonfinite_causes(values.pop(NONFINITE, 0.0))
        if causes:
            checkpointer.wait()
            message = nonfinite_message(step_no, causes, values, last_saved, checkpointer.directory)
            raise NonFiniteStep(message)
        zero_grads.add(step_no, values["grad_norm"])
        last_metrics = values
        if step_no % config.train.log_every == 0 or step_no == num_steps:
            writer.write(step_no, values)
            perf = speed.finished(step_no, time.perf_counter())
            writer.write(step_no, perf, perf=True)
            if perf:
                speeds.append(perf)

    with _Stop() as stop:
        try:
            for step in range(start, num_steps):
                micro = []
                for j in range(k):
                    host = sharding.global_sequence_ids(next(data))
                    if cache is not None:
                        host.update(cache.lookup(step * k + j))
                    micro.append(host)
                if getattr(objective, "prepare_batch", None) is not None:
                    micro = objective.prepare_batch(state, micro, step)
                step_tokens = sum(_tokens(h) for h in micro)
                tokens += step_tokens
                speed.add(step + 1, step_tokens, sum(objective.model_flops(model, spec, h) for h in micro))
                stacked = {key: np.stack([m[key] for m in micro]) for key in micro[0]}
                state, metrics = train_step(state, sharding.global_batch(mesh, stacked, stacked=True))
                drain(pending)
                pending = (step + 1, metrics)
                step_no = step + 1
                save_now = (
                    step_no % config.train.checkpoint_every == 0 or step_no == num_steps or stop.requested
                )
                if save_now:
                    drain(pending)  # never checkpoint a step whose loss was not checked
                    pending = None
                    writer.flush()  # a resume from this checkpoint finds every row up to it
                    checkpointer.save(step_no, state, data.get_state(), manifest)
                    last_saved = step_no
                if config.train.eval_every and step_no % config.train.eval_every == 0 and step_no < num_steps:
                    writer.write(step_no, run_eval(step_no))
                if progress is not None:
                    dt = max(time.time() - t_window, 1e-9)
                    # Metrics arrive one step late (async dispatch): no loss to show before then.
                    shown = {"loss": f"{last_metrics['loss']:.4f}"} if "loss" in last_metrics else {}
                    progress.set_postfix(**shown, tok_s=f"{tokens / dt:.0f}")
                    progress.update(1)
                    tokens, t_window = 0, time.time()
                if stop.requested:
                    checkpointer.wait()
                    message = f"{stop.signal_name}: saved checkpoint at step {step_no}; exiting"
                    if progress is not None:
                        progress.write(message)
                    else:
                        print(message, flush=True)
                    return {"stopped_at": step_no, "reason": stop.signal_name}
            drain(pending)
            pending = None
        finally:
            if progress is not None:
                progress.close()
            checkpointer.close()
            writer.close()

    # ---- final evaluation and summary
    final_eval = run_eval(num_steps)
    summary = {
        "steps": num_steps,
        "loss": config.loss.name,
        "wall_s": time.time() - t_start,
        **{f"train/{k_}": v for k_, v in last_metrics.items()},
        **{key: float(np.median([p[key] for p in speeds])) for key in (speeds[0] if speeds else {})},
        **final_eval,
        **stats.summary(),
        **zero_grads.summary(),
    }
    if jax.process_index() == 0:
        if final_eval:
            final_writer = MetricWriter(root, tensorboard=config.train.tensorboard)
            final_writer.write_once(num_steps, final_eval)  # a finished run's rerun adds no row
            final_writer.close()
        storage.write_text(root / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        if config.train.plot:
            plot_curves(root / "metrics.jsonl", root / "curves.png", spec.loss)
    summary["_state"] = state
    summary["_model"] = model
    return summary


def _no_copy(params: Any) -> Any:
    """What evaluation takes as the reference when the state holds none: the policy's params, or
    None with LoRA (the step's reference is then the policy's base, adapters off)."""
    return None if lora_lib.has_adapters(params) else params


def _build_cache(
    config: Any, workdir: str, model: Any, spec: Any, ref_params: Any, micro_size: int, num_micro: int
) -> reflib.ReferenceCache:
    """Precomputes the reference log-probs of every training micro-batch (resumable)."""
    mesh = model.mesh
    settings = {k: config.data[k] for k in ("source", "tokenizer", "kind", "layout", "max_length")}
    settings.update(
        micro_batch=micro_size, seed=config.seed, processes=jax.process_count(), num_micro=num_micro
    )
    key = reflib.cache_key(model.config, ckpt.fingerprint(ref_params), settings)
    directory = config.reference.cache_dir or storage.path(workdir) / "ref_cache"
    cache = reflib.ReferenceCache(directory, key, spec.required)
    if cache.complete(num_micro):
        return cache
    data, _ = data_iterator(config, config.data.source, micro_size, workdir=workdir)
    n = spec.num_sequences
    b = micro_size
    out_sharding = sharding.batch_sharding(mesh, 1)

    @functools.partial(jax.jit, compiler_options=logprobs.STRICT_ROUNDING)
    def compute(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        seq, _ = logprobs.batch_sequence_logps(model, params, batch, n)
        seq = jax.lax.with_sharding_constraint(seq, out_sharding)
        first = jax.lax.with_sharding_constraint(seq[:b], out_sharding)
        second = jax.lax.with_sharding_constraint(seq[b : 2 * b] if n > b else seq[:0], out_sharding)
        return {
            "ref_chosen_logps": first,
            "ref_rejected_logps": second,
            "ref_logps": first,
            "ref_kl_logps": second,
        }

    batches = (sharding.global_sequence_ids(h) for h in data)
    cache.build(batches, num_micro, lambda h: compute(ref_params, sharding.global_batch(mesh, h)))
    return cache
