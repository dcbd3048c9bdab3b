"""Shared pieces of the DPO-step benchmarks (``bench/dpo_step.py``, ``bench/gpu_dpo_step.py``).

* synthetic preference batches in the three layouts of ``alignjax.data.batching``;
* FLOP accounting (what MFU counts): ``alignjax.flops``' :func:`param_counts` and :func:`step_flops`,
  re-exported here;
* :class:`JaxDPO`: alignjax's jitted DPO train step, built the way ``alignjax.train.loop`` builds it
  (mesh -> ``jax.eval_shape`` -> shardings -> ``jit(init, out_shardings)`` -> ``jit(step, donate)``);
* :class:`TorchDPO`: the PyTorch/TRL baseline on the same weights: ``transformers``'
  ``LlamaForCausalLM``, TRL's ``DPOTrainer`` core step (one concatenated chosen+rejected forward of
  the policy, a no-grad forward of the reference or cached reference log-probs, the sigmoid DPO
  loss, backward, gradient clipping, ``torch.optim.AdamW``);
* :func:`interleave`: times several steps round-robin, so machine-load drift hits all alike.

Only jax / flax / optax / chex / numpy and alignjax's model, log-prob, step and batching modules are
imported at module level (what the GPU image holds); torch and transformers only inside
:class:`TorchDPO`. Nothing here is CUDA-specific: the JAX side runs unchanged on CPU, GPU or TPU.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from alignjax import logprobs, sharding
from alignjax.data.batching import first_fit, make_batch, padding_fraction
from alignjax.data.tokenize import TokenizedExample
from alignjax.flops import attention_pairs, param_counts, step_flops
from alignjax.models import Model
from alignjax.train.reference import stored_reference
from alignjax.train.step import StepSpec, make_train_step

GiB = 2**30

# --------------------------------------------------------------------------------------------- data


def synthetic_pairs(
    num_pairs: int,
    *,
    prompt_length: int,
    completion_length: int,
    vocab_size: int,
    seed: int = 0,
    skew: bool = False,
    max_length: int | None = None,
) -> list[TokenizedExample]:
    """Random-token preference pairs.

    ``skew=False``: every chosen/rejected sequence is exactly ``prompt_length + completion_length``
    tokens. ``skew=True``: prompt and completion lengths are drawn from a long-tailed (log-normal)
    distribution with medians ``prompt_length / 4`` and ``completion_length / 4``, each sequence
    clipped to ``max_length`` -- the shape of real preference data, where padding to the longest
    sequence wastes most of the batch.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_pairs):
        if skew:
            p = int(np.clip(rng.lognormal(np.log(prompt_length / 4), 0.8), 4, prompt_length))
            c1, c2 = (
                int(np.clip(rng.lognormal(np.log(completion_length / 4), 0.8), 2, completion_length))
                for _ in range(2)
            )
            if max_length is not None:
                c1, c2 = min(c1, max_length - p), min(c2, max_length - p)
        else:
            p, c1, c2 = prompt_length, completion_length, completion_length
        draw = lambda n: rng.integers(1, vocab_size, size=n).tolist()
        out.append(
            TokenizedExample(
                prompt=draw(p), completions=[draw(c1), draw(c2)], extras={}, where=f"synthetic:{i}"
            )
        )
    return out


def layout_batch(examples: list[TokenizedExample], layout: str, *, max_length: int) -> dict[str, np.ndarray]:
    """One host batch of ``examples`` in ``layout`` (``padded`` rows of ``max_length``; ``packed``
    rows of ``2 * max_length``, as many as first-fit needs; ``shared_prompt`` rows rounded up to a
    multiple of 16)."""
    if layout == "padded":
        return make_batch(examples, "padded", pad_id=0, buckets=(max_length,))
    if layout == "packed":
        lengths = [len(ex.prompt) + len(ex.completions[j]) for j in (0, 1) for ex in examples]
        rows = len(first_fit(lengths, 2 * max_length))
        return make_batch(examples, "packed", pad_id=0, pack_length=2 * max_length, pack_rows=rows)
    if layout == "shared_prompt":
        longest = max(len(ex.prompt) + len(ex.completions[0]) + len(ex.completions[1]) + 1 for ex in examples)
        return make_batch(examples, "shared_prompt", pad_id=0, buckets=(-(-longest // 16) * 16,))
    raise ValueError(f"layout={layout!r}; choose padded, packed or shared_prompt")


def sequence_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Tokens of the logical chosen + rejected sequences (a shared prompt counted once per sequence,
    as in the padded layout), so tokens/s compares across layouts as pairs/s does."""
    lengths = batch["chosen_lengths"].astype(np.int64) + batch["rejected_lengths"].astype(np.int64)
    b = len(batch["chosen_lengths"])
    if "branch_ids" in batch:
        prompt = np.sum((batch["branch_ids"] == 0) & (batch["segment_ids"] > 0), axis=1) + 1
    else:  # padded/packed: sequence i's length minus its completion is its prompt
        ids = batch["example_ids"]
        seq_len = np.array([np.sum(ids == i) for i in range(2 * b)])
        prompt = seq_len[:b] - batch["chosen_lengths"]
    return int(np.sum(lengths) + 2 * np.sum(prompt))


# ------------------------------------------------------------------------------------ alignjax step


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (decoupled weight decay) with global-norm clipping, identical on both sides.

    Defaults follow TRL/``transformers.Trainer``: lr 5e-7 is DPO's usual rate (1e-3 here only so
    the test sees parameters move), betas (0.9, 0.999), eps 1e-8, weight decay 0, clip 1.0.
    """

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0
    beta: float = 0.1


def place(mesh: Any, host: Mapping[str, np.ndarray], stacked: bool = True) -> dict[str, jax.Array]:
    """Host arrays -> global arrays split over the batch axes (``[1, ...]``-stacked micro-batch, as the
    train step takes them)."""
    out = {}
    for key, value in host.items():
        value = np.asarray(value)[None] if stacked else np.asarray(value)
        lead = (None,) if stacked else ()
        spec = PartitionSpec(*lead, sharding.BATCH_AXES, *([None] * (value.ndim - 1 - len(lead))))
        out[key] = jax.device_put(value, NamedSharding(mesh, spec))
    return out


class JaxDPO:
    """alignjax's DPO train step on one batch shape, built as ``alignjax.train.loop.run_train`` does.

    ``reference="model"``: the step runs a reference forward with ``state["ref_params"]``, stored as
    ``run_train`` stores a frozen reference (in the compute dtype; ``ref_dtype="param"``: in the param
    dtype, as before that change); ``"batch"``: the reference log-probs come precomputed in the batch
    (``add_reference_cache``). ``compiler_options`` default to ``run_train``'s
    (``logprobs.strict_rounding``); ``{}`` compiles with XLA's defaults.
    """

    def __init__(
        self,
        model: Model,
        params: Any,
        host_batch: Mapping[str, np.ndarray],
        *,
        reference: str = "model",
        optim: OptimConfig = OptimConfig(),
        vocab_chunk: int | None = None,
        seq_chunk: int | None = None,
        logit_width: int | None = None,
        ref_dtype: str = "compute",
        compiler_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.model, self.optim = model, optim
        if compiler_options is None:
            compiler_options = logprobs.strict_rounding(model.config.dtype)
        self.compiler_options = dict(compiler_options)
        self.mesh = model.mesh if model.mesh is not None else sharding.make_mesh({"data": -1})
        b = len(host_batch["chosen_lengths"])
        self.spec = StepSpec(
            loss="dpo",
            hyperparameters=(("beta", optim.beta),),
            kind="pairwise",
            batch_size=b,
            reference=reference,
            vocab_chunk=vocab_chunk,
            seq_chunk=seq_chunk,
            logit_width=logit_width,
        )
        self.tx = optax.chain(
            optax.clip_by_global_norm(optim.clip),
            optax.adamw(
                optim.learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
            ),
        )
        schedule = optax.constant_schedule(optim.learning_rate)
        keep_ref = reference == "model"
        ref_dtype = {"compute": model.config.dtype, "param": None}[ref_dtype]
        tx = self.tx

        def init(params: Any) -> dict[str, Any]:
            state = {
                "params": params,
                "opt_state": tx.init(params),
                "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.PRNGKey(0),
            }
            if keep_ref:
                state["ref_params"] = stored_reference(params, ref_dtype)
            return state

        # ---- abstract init -> shardings -> jit(init, out_shardings) -> jit(step, donate)
        param_shardings = model.shardings(self.mesh)
        repl = sharding.replicated(self.mesh)
        abstract = jax.eval_shape(init, params)
        self.state_shardings = {
            "params": param_shardings,
            "opt_state": optax.tree_map_params(
                tx,
                lambda _, s: s,
                abstract["opt_state"],
                param_shardings,
                transform_non_params=lambda _: repl,
            ),
            "step": repl,
            "rng": repl,
        }
        if keep_ref:
            self.state_shardings["ref_params"] = param_shardings
        self.state = jax.jit(init, out_shardings=self.state_shardings)(params)
        if reference == "batch":
            host_batch = self.add_reference_cache(params, host_batch)
        self.batch = place(self.mesh, {k: v for k, v in host_batch.items() if k != "label"})
        step = jax.jit(
            make_train_step(model, self.spec, tx, schedule),
            donate_argnums=(0,),
            out_shardings=(self.state_shardings, None),
            compiler_options=self.compiler_options,
        )
        t0 = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.metrics: dict[str, Any] = {}

    def add_reference_cache(self, ref_params: Any, host: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reference cache (``config.reference.kind=cache``): per-sequence summed log-probs of the
        frozen reference, computed once, outside the timed step."""
        b = self.spec.batch_size
        fwd = jax.jit(
            lambda p, batch: logprobs.batch_sequence_logps(
                self.model, p, batch, 2 * b, **self.spec.logprob_options
            )[0],
            compiler_options=self.compiler_options,
        )
        seq = np.asarray(fwd(ref_params, place(self.mesh, host, stacked=False)))
        return dict(host, ref_chosen_logps=seq[:b], ref_rejected_logps=seq[b:])

    def step(self) -> None:
        """One train step (asynchronous: call :meth:`sync` to wait for it)."""
        self.state, self.metrics = self.compiled(self.state, self.batch)

    def sync(self) -> None:
        jax.block_until_ready(self.metrics)

    def memory(self) -> dict[str, float]:
        """XLA's compiled memory analysis of the step (exact, allocator-independent), in GiB:
        arguments (state + batch), temporaries, outputs not aliased to donated inputs."""
        m = self.compiled.memory_analysis()
        if m is None:
            return {}
        args, temp = m.argument_size_in_bytes, m.temp_size_in_bytes
        out = m.output_size_in_bytes - m.alias_size_in_bytes
        return dict(args_gib=args / GiB, temp_gib=temp / GiB, peak_gib=(args + temp + out) / GiB)

    def values(self) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(self.metrics).items()}


# ---------------------------------------------------------------------------------- PyTorch / TRL


def hf_state_dict(model: Model, params: Any) -> dict[str, np.ndarray]:
    """The HF-layout tensors of ``params`` in memory (what ``save_pretrained`` writes to disk)."""
    from alignjax.models.hf import _leaf, tensor_maps

    dtype = np.dtype(jnp.dtype(model.config.param_dtype))
    return {
        m.hf_name: m.to_hf(np.asarray(jax.device_get(_leaf(params, m))).astype(dtype))
        for m in tensor_maps(model.config)
    }


class TorchDPO:
    """TRL's ``DPOTrainer`` core step (``loss_type="sigmoid"``) on ``transformers``' Llama.

    Per step: ``concatenated_forward`` of the policy on the ``[2B, T]`` chosen-then-rejected batch
    (with its attention mask), per-token log-probs ``gather(logits) - logsumexp(logits)`` in fp32 on
    the shifted labels (TRL's ``selective_log_softmax``), masked sums; the reference the same under
    ``torch.no_grad()`` (or the cached sums); ``-logsigmoid(beta ((c - rc) - (r - rr)))`` mean;
    backward; ``clip_grad_norm_``; ``AdamW.step``. ``amp_bf16`` runs forward/backward under
    ``torch.autocast(bfloat16)`` with fp32 master weights (TRL's ``bf16=True``). ``logits_to_keep``:
    TRL's ``use_logits_to_keep`` (``transformers``' ``logits_to_keep``: the head runs from the first
    position that predicts a counted token of any row).

    ``source``: an HF checkpoint directory (``alignjax.models.save_pretrained``) loaded with
    ``from_pretrained``, or an ``(hf_config_dict, state_dict)`` pair loaded in memory.
    """

    def __init__(
        self,
        source: str | tuple[dict, dict[str, np.ndarray]],
        host_batch: Mapping[str, np.ndarray],
        *,
        device: str = "cpu",
        reference: str = "model",
        optim: OptimConfig = OptimConfig(),
        amp_bf16: bool = False,
        threads: int | None = None,
        logits_to_keep: bool = False,
    ) -> None:
        import torch
        import transformers

        if threads:
            torch.set_num_threads(threads)
        self.torch, self.device, self.optim, self.amp_bf16 = torch, device, optim, amp_bf16
        self.policy = self._load(source, transformers).to(device)
        self.policy.train()
        self.ref = None
        if reference == "model":
            self.ref = self._load(source, transformers).to(device)
            self.ref.eval()
            self.ref.requires_grad_(False)
        t = lambda x, dt=None: torch.as_tensor(np.asarray(x), dtype=dt).to(device)
        self.input_ids = t(host_batch["input_ids"], torch.long)
        self.attention_mask = t(host_batch["segment_ids"] > 0, torch.long)
        self.loss_mask = t(host_batch["loss_mask"], torch.float32)[:, 1:]
        # TRL's use_logits_to_keep: logits from the first position that predicts a counted token
        self.first = 1
        if logits_to_keep:
            self.first = int(np.flatnonzero(np.asarray(host_batch["loss_mask"]).any(axis=0))[0])
            self.loss_mask = self.loss_mask[:, self.first - 1 :]
        self.b = len(host_batch["chosen_lengths"])
        self.ref_logps = torch.zeros(2 * self.b, device=device)  # reference-free ("none")
        if reference == "batch":
            self.ref_logps = t(
                np.concatenate([host_batch["ref_chosen_logps"], host_batch["ref_rejected_logps"]]),
                torch.float32,
            )
        cuda = device.startswith("cuda")
        self.opt = torch.optim.AdamW(
            self.policy.parameters(),
            lr=optim.learning_rate,
            betas=(optim.b1, optim.b2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            fused=True if cuda else None,
        )
        self.values_: dict[str, Any] = {}

    @staticmethod
    def _load(source: Any, transformers: Any) -> Any:
        import torch

        if isinstance(source, str):
            return transformers.LlamaForCausalLM.from_pretrained(
                source, dtype=torch.float32, attn_implementation="sdpa"
            )
        hf_config, tensors = source
        config = transformers.LlamaConfig(**hf_config)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        if config.tie_word_embeddings:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        model.model.rotary_emb.__init__(config=config)  # rebuild the non-persistent RoPE buffers off meta
        return model.float()

    def _seq_logps(self, model: Any) -> Any:
        torch = self.torch
        keep = self.input_ids.shape[1] - self.first + 1
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.amp_bf16):
            logits = model(
                input_ids=self.input_ids,
                attention_mask=self.attention_mask,
                use_cache=False,
                logits_to_keep=keep,
            ).logits
        logits = logits[:, :-1].float()
        labels = self.input_ids[:, self.first :]
        picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
        token = picked - torch.logsumexp(logits, dim=-1)
        return (token * self.loss_mask).sum(-1)

    def step(self) -> None:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        logps = self._seq_logps(self.policy)
        if self.ref is not None:
            with torch.no_grad():
                ref = self._seq_logps(self.ref)
        else:
            ref = self.ref_logps
        b = self.b
        logits = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])
        loss = -torch.nn.functional.logsigmoid(self.optim.beta * logits).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.optim.clip)
        self.opt.step()
        self.values_ = {"loss": loss.detach(), "grad_norm": grad_norm.detach()}

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def values(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.values_.items()}


# --------------------------------------------------------------------------------------- timing


def interleave(
    runners: Mapping[str, Any],
    *,
    rounds: int,
    steps: int,
    warmup: int = 1,
    deadline: float | None = None,
) -> dict[str, list[float]]:
    """Per-step seconds of each runner: ``warmup`` untimed steps each, then ``rounds`` rounds in which
    every runner does ``steps`` steps back to back (timed as one block, synchronised at its end).
    Round-robin order spreads load drift on a shared machine over all runners alike. Stops early
    (after a full round) once ``time.time() > deadline``."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
        runner.sync()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                runner.step()
            runner.sync()
            times[name].append((time.perf_counter() - t0) / steps)
        if deadline is not None and time.time() > deadline:
            break
    return times


def matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of one large square ``jnp.dot`` on the default device (a practical ceiling),
    as the step computes its dots: ``dtype`` operands, fp32 accumulation, the step's compiler options
    (``logprobs.strict_rounding(dtype)``: on CPU, bf16 dots run on YNNPACK)."""
    x = jnp.ones((size, size), dtype)
    f = jax.jit(
        lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(dtype),
        compiler_options=logprobs.strict_rounding(dtype),
    )
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def torch_matmul_peak(
    dtype: str = "float32", size: int = 2048, repeats: int = 5, device: str = "cpu"
) -> float:
    """Measured FLOP/s of one large square ``torch.mm`` (oneDNN on CPU; AMX where the CPU has it)."""
    import torch

    x = torch.ones((size, size), dtype=getattr(torch, dtype), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(x, x)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(x, x)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


# CPU features that decide matmul speed: AVX-512 (and its bf16/VNNI forms) and AMX tiles.
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _first_cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0].splitlines()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first)}


def machine() -> dict[str, Any]:
    """Where the figures were taken: CPU model and cores, accelerator, load, versions, date."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    cpuinfo = _first_cpuinfo()
    flags = cpuinfo.get("flags", "").split()
    info["cpu_flags"] = [f for f in MATMUL_FLAGS if f in flags]
    if "model name" in cpuinfo:
        info["cpu_model"] = cpuinfo["model name"]
        # On VMs "AMD EPYC" or "Intel(R) Xeon(R) Processor" names several generations; these tell them apart
        info["cpu_family_model"] = f"{cpuinfo.get('cpu family', '?')}/{cpuinfo.get('model', '?')}"
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):  # the GPU's name and driver, where there is one
        q = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        info["nvidia_smi"] = subprocess.run(q, capture_output=True, text=True, check=False).stdout.strip()
    return info


def summarize(times: list[float]) -> dict[str, float]:
    return dict(median_s=float(np.median(times)), min_s=float(np.min(times)), n=len(times))


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


__all__ = [
    "JaxDPO",
    "OptimConfig",
    "TorchDPO",
    "attention_pairs",
    "hf_state_dict",
    "interleave",
    "layout_batch",
    "machine",
    "matmul_peak",
    "padding_fraction",
    "param_counts",
    "place",
    "sequence_tokens",
    "step_flops",
    "synthetic_pairs",
    "summarize",
]
