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
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

import alignjax.losses as losses
from alignjax import flops, logprobs, models, sharding, storage
from alignjax.data import make_preference_batches
from alignjax.data.pipeline import TooFewExamples, eval_plan, resolve_cache_dir, tokenize_options
from alignjax.models import lora as lora_lib
from alignjax.train import checkpoint as ckpt
from alignjax.train import reference as reflib
from alignjax.train import workdir as workdirlib
from alignjax.train.evaluation import evaluate
from alignjax.train.guards import NonFiniteStep, Stop, ZeroGradients, nonfinite_message
from alignjax.train.metrics import MetricWriter, Progress, Throughput, plot_curves
from alignjax.train.objective import Objective, RolloutObjective
from alignjax.train.optim import make_optimizer
from alignjax.train.result import TrainResult
from alignjax.train.state import restore_or_init, state_layout
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


def reference_from_path(
    config: Any, policy: Any, mesh: Any, rules: Any, vocab_size: int, heads: tuple
) -> Any:
    """The frozen reference's params from ``config.reference.path`` (an HF directory), built as the
    policy is from ``config.model`` (dtypes, layer layout, adapters, aux heads), because the step
    applies the reference with the policy's model. Refused in one line: a preset or a training
    workdir in its place, ``reference.kind='none'``, or weights not shaped like the policy's."""
    path = config.reference.path
    where = f"config.reference.path={path!r}"
    if config.reference.kind == "none":
        raise ValueError(f"{where} is set but config.reference.kind='none' runs no reference")
    if path in models.PRESETS:
        raise ValueError(
            f"{where} is a preset, whose weights would be a fresh initialisation; give an HF directory, "
            "or leave it empty for a copy of the policy's initialisation"
        )
    if workdirlib.holds_run(path):
        raise ValueError(
            f"{where} is a training workdir; export it first (python -m alignjax.export "
            f"--workdir={path} --out=OUT) and give OUT"
        )
    model_config = config.model.to_dict()
    model_config["path"] = path
    _, params = build_model(ml_collections.ConfigDict(model_config), mesh, rules, vocab_size, heads)
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
    if shapes(params) != shapes(policy.abstract_params()):
        raise ValueError(
            f"{where}: its weights are not shaped like the policy's (config.model.path="
            f"{config.model.path!r}); the reference must be the same architecture"
        )
    return params


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


def model_flops(model: Any, spec: Any, host: Mapping[str, np.ndarray]) -> float:
    """Model FLOPs of one preference/SFT micro-batch: the policy's forward + backward through the
    language-model head, and the reference forward when the step runs one (``alignjax.flops``)."""
    return flops.step_flops(model.config, host, reference_forward=spec.reference == "model")["total"]


class PreferenceObjective:
    """Preference and SFT training: the losses of ``config.loss`` through :mod:`alignjax.train.step`."""

    make_step_spec = staticmethod(make_step_spec)
    make_train_step = staticmethod(make_train_step)
    make_eval_fn = staticmethod(make_eval_fn)
    evaluate = staticmethod(evaluate)
    model_flops = staticmethod(model_flops)


PREFERENCE: Objective = PreferenceObjective()


# ------------------------------------------------------------------------------------------ the loop


def micro_batch_size(config: Any, mesh: Any) -> tuple[int, int]:
    """``(k, examples per micro-batch)``: ``config.data.batch_size`` split into
    ``config.optim.grad_accum_steps`` micro-batches, each divisible over the mesh's data shards."""
    k = int(config.optim.grad_accum_steps)
    if config.data.batch_size % k:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} must be divisible by "
            f"config.optim.grad_accum_steps={k}"
        )
    micro = config.data.batch_size // k
    check_batch_divides_mesh(config, mesh, micro)
    return k, micro


def training_data(
    config: Any, workdir: Any, micro_size: int, *, check_columns: bool
) -> tuple[Any, Any, list]:
    """``(train iterator, its DataStats, held-out host batches)``: the held-out rows come from
    ``data.eval_source`` or ``data.eval_fraction`` of the source (:func:`eval_plan`), at most
    ``data.num_eval``; ``check_columns`` checks on one batch, before any compile, that the data
    carries every column the loss reads."""
    plan = eval_plan(config.data.source, config.data.eval_source, config.data.get("eval_fraction", 0.0))
    if config.data.eval_source and plan is None:
        print(
            f"data.eval_source={config.data.eval_source} is a built-in set and data.source is not: not "
            "evaluating on it (set data.eval_source or data.eval_fraction)",
            flush=True,
        )
    split = "train" if plan is not None and plan[1] == "eval" else "all"
    data, stats = data_iterator(config, config.data.source, micro_size, split=split, workdir=workdir)
    if check_columns:
        before = data.get_state()
        check_data_columns(config, next(data).keys(), config.data.source)
        data.set_state(before)
    held_out: list[dict[str, np.ndarray]] = []
    if plan is not None:
        eval_data, _ = data_iterator(
            config, plan[0], config.data.eval_batch_size, shuffle=False, num_epochs=1, split=plan[1],
            batch_key="config.data.eval_batch_size", workdir=workdir,
        )  # fmt: skip
        for host in eval_data:
            held_out.append(sharding.global_sequence_ids(host))
            if len(held_out) * config.data.eval_batch_size >= config.data.num_eval:
                break
    return data, stats, held_out


class _Metrics:
    """The step's metrics, read one step late (the host never waits on the device step it just
    dispatched): a non-finite step stops the run, every ``log_every``-th row is written with its
    ``perf/*`` figures."""

    def __init__(self, config: Any, writer: MetricWriter, speed: Throughput, checkpointer: Any, start: int):
        self.config, self.writer, self.speed, self.checkpointer = config, writer, speed, checkpointer
        self.pending: tuple[int, Any] | None = None
        self.last: dict[str, float] = {}
        self.last_saved = start if start else None
        self.speeds: list[dict[str, float]] = []
        self.zero_grads = ZeroGradients(float(config.optim.learning_rate))

    def add(self, step_no: int, metrics: Any) -> None:
        self.drain()
        self.pending = (step_no, metrics)

    def drain(self) -> None:
        if self.pending is None:
            return
        (step_no, metrics), self.pending = self.pending, None
        values = {key: float(v) for key, v in jax.device_get(metrics).items()}
        causes = nonfinite_causes(values.pop(NONFINITE, 0.0))
        if causes:
            self.checkpointer.wait()
            raise NonFiniteStep(
                nonfinite_message(step_no, causes, values, self.last_saved, self.checkpointer.directory)
            )
        self.zero_grads.add(step_no, values["grad_norm"])
        self.last = values
        if step_no % self.config.train.log_every == 0 or step_no == int(self.config.train.num_steps):
            self.writer.write(step_no, values)
            perf = self.speed.finished(step_no, time.perf_counter())
            self.writer.write(step_no, perf, perf=True)
            if perf:
                self.speeds.append(perf)


def run_train(
    config: Any,
    workdir: storage.PathLike,
    *,
    init_params: Any = None,
    ref_params: Any = None,
    model: Any = None,
    objective: Objective = PREFERENCE,
) -> TrainResult:
    """Trains per ``config`` in ``workdir`` (resuming from its last checkpoint); returns the summary it
    writes to ``summary.json``, the final state and the model (:class:`TrainResult`; a run stopped by
    SIGTERM/SIGINT returns ``{"stopped_at", "reason"}`` as its summary and no state).

    ``init_params`` / ``ref_params`` (already on the mesh, optional) start the policy / reference from
    given params, e.g. the SFT stage of the quickstart; ``model`` reuses a built model; ``objective``
    replaces the preference step (:class:`alignjax.train.objective.Objective`).
    """
    t_start = time.time()
    root = storage.path(workdir)  # a local directory or gs://...; every file below goes through it
    root.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.rules_from_config(config.rules or None)
    k, micro_size = micro_batch_size(config, mesh)
    num_steps = int(config.train.num_steps)
    data, stats, held_out = training_data(config, workdir, micro_size, check_columns=objective is PREFERENCE)

    # ---- model, step spec, state
    spec = objective.make_step_spec(config, micro_size, reflib.step_reference_mode(config.reference.kind))
    heads = aux_heads(spec.required, dict(spec.provider_hyperparameters)) if objective is PREFERENCE else ()
    if model is None:
        model, pretrained = build_model(config.model, mesh, rules, data.tokenizer.vocab_size, heads)
        init_params = pretrained if init_params is None else init_params
    if ref_params is None and config.reference.get("path"):
        ref_params = reference_from_path(config, model, mesh, rules, data.tokenizer.vocab_size, heads)
    check_aux_heads(model, heads)
    tx, schedule = make_optimizer(config.optim, num_steps)
    keep_ref = spec.reference == "model" and (
        ref_params is not None or reflib.keeps_copy(config.reference.kind, model)
    )  # LoRA: the reference is the policy's base, no copy
    sync_every = int(config.reference.sync_every) if config.reference.kind == "ema" else 0
    layout = state_layout(
        model, tx, rules=rules, seed=config.seed, init_params=init_params, ref_params=ref_params,
        keep_ref=keep_ref, sync_every=sync_every,
        loss_state=losses.get(spec.loss).init_state() if spec.stateful else None,
    )  # fmt: skip
    checkpointer = ckpt.Checkpointer(
        root / "checkpoints", keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints
    )
    writer = MetricWriter(workdir, tensorboard=config.train.tensorboard)
    start, state = restore_or_init(layout, checkpointer, data, writer)
    cache = None
    if spec.reference == "batch":  # kind=cache: built once, then read into each batch
        ref = init_params if ref_params is None else ref_params
        cache = reference_cache(config, workdir, model, spec, layout, ref, micro_size, num_steps * k)

    strict = logprobs.strict_rounding(model.config.dtype)
    train_step = jax.jit(
        objective.make_train_step(
            model, spec, tx, schedule, sync_every=sync_every, sync_alpha=float(config.reference.alpha)
        ),
        donate_argnums=(0,),
        out_shardings=(layout.shardings, None),
        compiler_options=strict,
    )
    eval_spec = dataclasses.replace(spec, batch_size=config.data.eval_batch_size)
    eval_fn = jax.jit(objective.make_eval_fn(model, eval_spec), compiler_options=strict)
    eval_batches = [] if cache is not None else [sharding.global_batch(mesh, h) for h in held_out]
    beta = float(dict(spec.hyperparameters).get("beta", 1.0))  # held-out batches have no cached reference

    def run_eval() -> dict[str, float]:
        if not eval_batches:
            return {}
        ref = state.get("ref_params", _no_copy(state["params"]))
        return objective.evaluate(eval_fn, state["params"], ref, eval_batches, beta)

    # ---- the steps
    progress = Progress(config, num_steps, start, spec.loss)
    speed = Throughput(
        local_devices=jax.local_device_count(),
        processes=jax.process_count(),
        peak_flops=flops.peak_flops_per_device(jax.devices()[0].device_kind),
    )
    metrics = _Metrics(config, writer, speed, checkpointer, start)
    with Stop() as stop:
        try:
            for step in range(start, num_steps):
                micro = [sharding.global_sequence_ids(next(data)) for _ in range(k)]
                for j, host in enumerate(micro if cache is not None else ()):
                    host.update(cache.lookup(step * k + j))
                if isinstance(objective, RolloutObjective):
                    micro = objective.prepare_batch(state, micro, step)
                step_tokens = sum(_tokens(h) for h in micro)
                speed.add(step + 1, step_tokens, sum(objective.model_flops(model, spec, h) for h in micro))
                state, step_metrics = train_step(state, stacked_batch(mesh, micro))
                step_no = step + 1
                metrics.add(step_no, step_metrics)
                if step_no % config.train.checkpoint_every == 0 or step_no == num_steps or stop.requested:
                    metrics.drain()  # never checkpoint a step whose loss was not checked
                    writer.flush()  # a resume from this checkpoint finds every row up to it
                    checkpointer.save(step_no, state, data.get_state(), layout.manifest)
                    metrics.last_saved = step_no
                if config.train.eval_every and step_no % config.train.eval_every == 0 and step_no < num_steps:
                    writer.write(step_no, run_eval())
                progress.update(step_tokens, metrics.last)
                if stop.requested:
                    checkpointer.wait()
                    progress.say(f"{stop.signal_name}: saved checkpoint at step {step_no}; exiting")
                    return TrainResult({"stopped_at": step_no, "reason": stop.signal_name}, None, model)
            metrics.drain()
        finally:
            progress.close()
            checkpointer.close()
            writer.close()

    # ---- final evaluation and summary
    final_eval = run_eval()
    summary = {
        "steps": num_steps,
        "loss": config.loss.name,
        "wall_s": time.time() - t_start,
        **{f"train/{k_}": v for k_, v in metrics.last.items()},
        **{key: float(np.median([p[key] for p in metrics.speeds])) for key in dict(*metrics.speeds[:1])},
        **final_eval,
        **stats.summary(),
        **metrics.zero_grads.summary(),
    }
    if jax.process_index() == 0:
        write_outputs(config, root, num_steps, final_eval, summary, spec.loss)
    return TrainResult(summary, state, model)


def reference_cache(
    config: Any, workdir: storage.PathLike, model: Any, spec: Any, layout: Any, ref_params: Any,
    micro_size: int, num_micro_batches: int,
) -> Any:  # fmt: skip
    """``reference.kind=cache``: the precomputed reference log-probs of every micro-batch the run
    will draw, built once (``reflib.build_cache``) from ``ref_params``, or from the policy's own
    initialisation (the key ``init`` draws it from) when none is given."""
    if ref_params is None:
        init = lambda r: model.init(jax.random.split(r)[0])  # noqa: E731
        ref_params = jax.jit(init, out_shardings=layout.shardings["params"])(layout.rng)

    def batches():
        data_again, _ = data_iterator(config, config.data.source, micro_size, workdir=workdir)
        return (sharding.global_sequence_ids(h) for h in data_again)

    return reflib.build_cache(config, workdir, model, spec, ref_params, num_micro_batches, batches)


def stacked_batch(mesh: Any, micro: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """One step's host micro-batches stacked on a leading axis (the step scans over it), as global
    arrays on ``mesh``."""
    stacked = {key: np.stack([m[key] for m in micro]) for key in micro[0]}
    return sharding.global_batch(mesh, stacked, stacked=True)


def write_outputs(
    config: Any, root: Any, num_steps: int, final_eval: dict[str, float], summary: dict[str, Any], loss: str
) -> None:
    """Process 0's files of a finished run: the final evaluation's row (once: a finished run's rerun
    adds none), ``summary.json`` and ``curves.png``."""
    if final_eval:
        final_writer = MetricWriter(root, tensorboard=config.train.tensorboard)
        final_writer.write_once(num_steps, final_eval)
        final_writer.close()
    storage.write_text(root / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    if config.train.plot:
        plot_curves(root / "metrics.jsonl", root / "curves.png", loss)


def _no_copy(params: Any) -> Any:
    """What evaluation takes as the reference when the state holds none: the policy's params, or
    None with LoRA (the step's reference is then the policy's base, adapters off)."""
    return None if lora_lib.has_adapters(params) else params
