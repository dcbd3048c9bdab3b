"""A training workdir -> a complete Hugging Face checkpoint directory.

  python -m alignjax.export --workdir=DIR [--step=N] --out=OUT [--dtype=bfloat16] [--max_shard_size=5GB]
  python -m alignjax.export --workdir=DIR --peft=ADAPTER_DIR     # a LoRA run's adapter, PEFT's format

reads the run's ``config.json`` and its latest (or step ``N``) orbax checkpoint, and writes to ``OUT``
(local or ``gs://``): ``config.json`` with ``bos/eos/pad_token_id``, ``generation_config.json``,
safetensors (``model.safetensors``, or shards of at most ``max_shard_size`` with
``model.safetensors.index.json``) and the tokenizer of ``config.data.tokenizer`` with its chat
template (``ChatTokenizer.save_pretrained``: ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``). Policy runs load with ``AutoModelForCausalLM``; reward-model runs
(``job=reward_model``, value heads) with ``AutoModelForSequenceClassification``. A LoRA run
(``config.model.lora.rank > 0``) is written merged (``W + s A B``; QLoRA's base dequantized), and with
``--peft`` its adapter as PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``
(``alignjax.models.lora.save_peft``), which ``peft.PeftModel.from_pretrained`` loads onto the base
model (``config.model.path``; ``--out`` is then optional).

Memory: the params are restored sharded over all devices (an fsdp mesh), and each tensor is gathered
to the host, cast, written and dropped in turn (``alignjax.models.hf.write_safetensors``), so a host
holds one tensor beyond its shards. Run it on every process of a multi-host slice (the gathers are
collective); process 0 writes.

:func:`load_run` (the model and params of a workdir) is also how ``experiments/score.py`` takes a
workdir as ``model=`` / ``reference=`` (``DIR`` or ``DIR@STEP``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from alignjax import sharding, storage
from alignjax.data import resolve_tokenizer
from alignjax.models import PRESETS, Model, ModelConfig, from_pretrained, lora, save_pretrained
from alignjax.models.heads import HeadConfig
from alignjax.models.hf import parse_size
from alignjax.reward.export import save_classifier
from alignjax.reward.model import RewardModel
from alignjax.train import workdir as workdirlib
from alignjax.train.checkpoint import fingerprint

CHECKPOINTS = "checkpoints"
ITEMS = ("state", "data", "manifest")  # alignjax.train.checkpoint.Checkpointer's items


@dataclasses.dataclass
class Run:
    """A restored training run: its config (a dict of the workdir's config.json), the checkpoint
    step, the model (``Model`` or, for reward-model runs, ``RewardModel``) and its params."""

    config: dict[str, Any]
    step: int
    model: Any
    params: Any

    @property
    def is_reward_model(self) -> bool:
        return self.config.get("job") == "reward_model"


def split_step(ref: str) -> tuple[str, int | None]:
    """``"DIR@STEP"`` -> ``("DIR", STEP)``; anything else -> ``(ref, None)``."""
    head, sep, tail = str(ref).rpartition("@")
    return (head, int(tail)) if sep and tail.isdigit() else (str(ref), None)


def is_workdir(path: str) -> bool:
    """True for a training workdir ``DIR[@STEP]`` (:func:`alignjax.train.workdir.holds_run`), with or
    without checkpoints yet (loading one without is :func:`resolve_step`'s clear error)."""
    return workdirlib.holds_run(split_step(path)[0])


def checkpoint_manager(workdir: str) -> Any:
    """A read-only view of the run's checkpoints (never cleans up a running job's temporary files)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    return ocp.CheckpointManager(storage.path(workdir) / CHECKPOINTS, options=options, item_names=ITEMS)


def read_config(workdir: str) -> dict[str, Any]:
    root = storage.path(workdir)
    if not root.exists():
        raise FileNotFoundError(f"--workdir={workdir}: no such directory")

    flat = workdirlib.effective_config(root)
    if flat is None:
        file = root / workdirlib.CONFIG
        raise FileNotFoundError(f"{file}: no such file (not a training workdir: alignjax.main writes it)")
    return workdirlib.unflatten(flat)  # config.json as the run's allowed changes left it


def resolve_step(workdir: str, manager: Any, step: int | None) -> int:
    """The requested step, or the latest; one clear error when there is none."""
    steps = sorted(manager.all_steps()) if (storage.path(workdir) / CHECKPOINTS).exists() else []
    if not steps:
        raise FileNotFoundError(f"{storage.path(workdir) / CHECKPOINTS}: no checkpoint to load")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(
            f"{storage.path(workdir) / CHECKPOINTS}: no checkpoint at step {step} (steps: {steps})"
        )
    return step


def build_model(manifest: dict[str, Any], *, mesh: Any, rules: Any) -> Any:
    """The ``Model`` (or ``RewardModel``) a checkpoint manifest describes, without params."""
    saved = manifest["model_config"]
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    decoder_config = lambda d: ModelConfig(**{k: v for k, v in d.items() if k in fields})  # noqa: E731
    if "decoder" in saved:  # RewardModelConfig(decoder, head)

        decoder = Model(decoder_config(saved["decoder"]), mesh=mesh, rules=rules)
        return RewardModel(decoder, HeadConfig(**saved["head"]))
    return Model(decoder_config(saved), mesh=mesh, rules=rules)


def restore_params(manager: Any, step: int, shardings: Any = None) -> Any:
    """The ``params`` of checkpoint ``step`` only (no optimizer state), placed with ``shardings``
    (a tree like the params), or on one device as it was saved."""
    import orbax.checkpoint as ocp

    item = manager.directory / str(step) / "state"
    meta = ocp.StandardCheckpointer().metadata(item)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        shardings = jax.tree.map(lambda _: device, tree["params"])
    abstract = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree["params"], shardings
    )
    restored = ocp.PyTreeCheckpointer().restore(
        item,
        args=ocp.args.PyTreeRestore(
            item={"params": abstract},
            restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract}),
            partial_restore=True,
        ),
    )
    return restored["params"]


def load_checkpoint_params(workdir: str, step: int | None = None) -> Any:
    """The params ``{"decoder", "head"}`` of the run in ``workdir`` (latest checkpoint, or ``step``) as
    host numpy arrays."""
    manager = checkpoint_manager(workdir)
    params = restore_params(manager, resolve_step(workdir, manager, step))
    return jax.tree.map(np.asarray, params)


def load_run(workdir: str, step: int | None = None, *, mesh: Any = None, rules: Any = None) -> Run:
    """The model and params of the run in ``workdir`` at ``step`` (default: the latest checkpoint).

    ``mesh`` places the params (default: all devices on the fsdp axis, the least memory per device);
    ``rules``: logical-axis rules (default: the run's ``config.rules``).
    """
    workdir, at = split_step(workdir)
    step = at if step is None else step
    config = read_config(workdir)
    manager = checkpoint_manager(workdir)
    step = resolve_step(workdir, manager, step)
    import orbax.checkpoint as ocp

    manifest = manager.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
    mesh = mesh if mesh is not None else sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = rules if rules is not None else sharding.rules_from_config(config.get("rules") or None)
    model = build_model(dict(manifest), mesh=mesh, rules=rules)
    if "base_fingerprint" in manifest:  # a LoRA run: the checkpoint holds the trainable leaves only

        base = base_params(config, model)
        shardings = lora.trainable_tree(model.shardings(mesh, rules))
        params = lora.fill_frozen(restore_params(manager, step, shardings), base)
        if not np.allclose(
            fingerprint(lora.frozen_part(params)), manifest["base_fingerprint"], rtol=1e-5, atol=1e-6
        ):
            raise ValueError(
                f"{workdir}: the base model rebuilt from config.model.path={config['model']['path']!r} "
                "is not the one the run's adapters were trained on"
            )
    else:
        params = restore_params(manager, step, model.shardings(mesh, rules))
    model.params = params
    return Run(config=config, step=step, model=model, params=params)


def base_params(config: dict[str, Any], model: Any) -> Any:
    """The initial params of a LoRA run, built as its train loop built them: a preset initialised
    from ``config.seed``, or the HF checkpoint at ``config.model.path`` with fresh adapters (and a
    reward model's fresh head); only their frozen base is used."""
    path = config["model"]["path"]
    if path in PRESETS:
        return model.init(jax.random.split(jax.random.PRNGKey(int(config["seed"])))[0])
    decoder = getattr(model, "decoder", model)
    c = decoder.config
    loaded = from_pretrained(
        path,
        dtype=c.param_dtype,
        compute_dtype=c.dtype,
        scan_layers=c.scan_layers,
        lora=c.lora,
        mesh=decoder.mesh,
        rules=decoder.rules,
    ).params
    if decoder is model:
        return loaded
    return {"decoder": loaded, "head": model.init_head(jax.random.PRNGKey(0))}


def export_run(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    dtype: str = "bfloat16",
    max_shard_size: int | str = "5GB",
    peft: str | None = None,
) -> dict[str, Any]:
    """Writes the run in ``workdir`` to ``out`` as an HF checkpoint (module docstring), and a LoRA
    run's adapter to ``peft`` in PEFT's format; returns what was written."""
    parse_size(max_shard_size)  # a bad size fails before the restore
    run = load_run(workdir, step)
    report: dict[str, Any] = {"workdir": workdir, "step": run.step}
    if peft:
        if run.is_reward_model or lora.model_lora(run.model) is None:
            raise ValueError(
                f"--peft: the run in {workdir} is not a LoRA policy run (config.model.lora.rank > 0, "
                "job=train)"
            )
        lora.save_peft(run.model, run.params, peft, base_model=run.config["model"]["path"])
        report["peft"] = str(peft)
    if not out:
        return report
    tokenizer = resolve_tokenizer(run.config["data"]["tokenizer"])
    if run.is_reward_model:
        save_classifier(
            run.model,
            run.params,
            out,
            pad_token_id=tokenizer.pad_id,
            dtype=dtype,
            max_shard_size=max_shard_size,
            tokenizer=tokenizer,
        )
    else:
        save_pretrained(
            run.model, run.params, out, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tokenizer
        )
    kind = "AutoModelForSequenceClassification" if run.is_reward_model else "AutoModelForCausalLM"
    return {**report, "out": str(out), "dtype": dtype, "loads_as": kind}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"error: {message} (usage: python -m alignjax.export --workdir=DIR --out=OUT)\n")


def main(argv: Sequence[str] | None = None) -> int:
    from absl import logging

    from alignjax.main import USER_ERRORS, error_line

    logging.set_verbosity(logging.ERROR)  # orbax warns that the manager is read-only, as asked
    parser = _Parser(prog="python -m alignjax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (local or gs://)")
    parser.add_argument("--out", default="", help="output directory (local or gs://)")
    parser.add_argument("--peft", default="", help="a LoRA run's adapter in PEFT's format, to this directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--max_shard_size", default="5GB", help="e.g. 5GB, 500MB, 2GiB or bytes")
    args = parser.parse_args(argv)
    if not args.out and not args.peft:
        parser.error("give --out (the HF checkpoint) and/or --peft (a LoRA run's adapter)")
    try:
        report = export_run(
            args.workdir,
            args.out,
            step=args.step,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            peft=args.peft or None,
        )
    except USER_ERRORS as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
