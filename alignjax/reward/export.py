"""Saving and loading trained reward models.

* Value heads export to the Hugging Face layout of ``AutoModelForSequenceClassification``
  (``LlamaForSequenceClassification`` etc.): the decoder's tensors, ``score.weight`` [K, D]
  (K = number of value heads, 1 for a Bradley-Terry model) and ``config.json`` with
  ``architectures``, ``num_labels`` and ``pad_token_id`` (HF reads the reward at the last non-pad
  token of each row, found through ``pad_token_id``). ``lm_head.weight`` stays in the file so that
  the directory also loads as the causal LM it was fine-tuned from; HF's classifier ignores it.
* Every head (GPM and PAL included) is part of the params ``{"decoder", "head"}`` in the run's orbax
  checkpoint; :func:`load_checkpoint_params` reads them back without rebuilding the optimizer.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from alignjax.models import from_pretrained, save_pretrained
from alignjax.models.heads import HeadConfig
from alignjax.reward.model import RewardModel


def save_classifier(model: RewardModel, params: Any, path: str, *, pad_token_id: int) -> None:
    """Writes the value-head reward model to ``path`` as an HF sequence classifier."""
    from safetensors.numpy import load_file, save_file

    if model.head_config.kind != "value":
        raise ValueError(
            f"only value heads export as AutoModelForSequenceClassification; this is a "
            f"{model.head_config.kind!r} head (it is saved with the run's checkpoint)"
        )
    save_pretrained(model.decoder, params["decoder"], path)
    score = np.asarray(jax.device_get(params["head"]["score"]))  # [D, K]
    if jax.process_index() != 0:
        return
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["score.weight"] = np.ascontiguousarray(score.T.astype(next(iter(tensors.values())).dtype))
    tmp = weights + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, weights)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        hf = json.load(f)
    k = score.shape[1]
    hf["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification") for a in hf["architectures"]]
    hf.update(
        num_labels=k,
        id2label={str(i): f"LABEL_{i}" for i in range(k)},
        label2id={f"LABEL_{i}": i for i in range(k)},
        pad_token_id=int(pad_token_id),
        problem_type="regression",
    )
    with open(config_file, "w") as f:
        json.dump(hf, f, indent=2)


def load_classifier(path: str, *, dtype: str = "float32", mesh: Any = None, rules: Any = None) -> RewardModel:
    """An HF sequence-classification directory -> ``RewardModel`` with ``.params`` and ``.pad_token_id``."""
    from safetensors import safe_open

    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{path}: no config.json (not an exported reward model)")
    with open(config_file) as f:
        hf = json.load(f)
    decoder = from_pretrained(path, dtype=dtype, mesh=mesh, rules=rules)
    weights = os.path.join(path, "model.safetensors")
    with safe_open(weights, framework="numpy") as f:
        if "score.weight" not in f.keys():
            raise ValueError(f"{weights}: no 'score.weight' tensor: not a sequence-classification checkpoint")
        score = f.get_tensor("score.weight")
    if score.shape[1] != decoder.config.hidden_size:
        raise ValueError(
            f"{weights}: score.weight has shape {score.shape}, expected "
            f"[num_labels, {decoder.config.hidden_size}]"
        )
    rm = RewardModel(decoder, HeadConfig(kind="value", num_heads=score.shape[0]))
    rm.params = {"decoder": decoder.params, "head": {"score": jax.numpy.asarray(score.T.astype(np.float32))}}
    rm.pad_token_id = hf.get("pad_token_id")
    return rm


def load_checkpoint_params(workdir: str, step: int | None = None) -> Any:
    """The params ``{"decoder", "head"}`` of the run in ``workdir`` (latest checkpoint, or ``step``) as
    host numpy arrays."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if step is None:
        steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
        if not steps:
            raise FileNotFoundError(f"{directory}: no checkpoint to load")
        step = max(steps)
    item = os.path.join(directory, str(step), "state")
    meta = ocp.StandardCheckpointer().metadata(item)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree["params"])
    restored = ocp.PyTreeCheckpointer().restore(
        item, args=ocp.args.PyTreeRestore(item={"params": abstract}, partial_restore=True)
    )
    return jax.tree.map(np.asarray, restored["params"])
