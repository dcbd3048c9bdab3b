"""Saving and loading trained reward models.

* Value heads export to the Hugging Face layout of ``AutoModelForSequenceClassification``
  (``LlamaForSequenceClassification`` etc.): the decoder's tensors without ``lm_head.weight`` (the
  classifier has none: HF would report it UNEXPECTED), ``score.weight`` [K, D] (K = number of value
  heads, 1 for a Bradley-Terry model) and ``config.json`` with ``architectures``, ``num_labels`` and
  ``pad_token_id`` (HF reads the reward at the last non-pad token of each row, found through
  ``pad_token_id``). It is written by ``alignjax.models.save_pretrained``, the one export path
  (one tensor on a host at a time, safetensors shards past ``max_shard_size``).
* Every head (GPM and PAL included) is part of the params ``{"decoder", "head"}`` in the run's orbax
  checkpoint; :func:`alignjax.export.load_checkpoint_params` reads them back without rebuilding the
  optimizer.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from alignjax.models import Model, ModelConfig, load_params, save_pretrained
from alignjax.models.heads import HeadConfig
from alignjax.models.hf import DEFAULT_MAX_SHARD_SIZE, ExportTensor, weight_files
from alignjax.reward.model import RewardModel
from alignjax.sharding import gather_to_host


def classifier_config(hf_architectures: list[str], num_labels: int, pad_token_id: int) -> dict[str, Any]:
    """The ``config.json`` keys that make a causal-LM config a sequence classifier's."""
    return dict(
        architectures=[a.replace("ForCausalLM", "ForSequenceClassification") for a in hf_architectures],
        num_labels=num_labels,
        id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
        label2id={f"LABEL_{i}": i for i in range(num_labels)},
        pad_token_id=int(pad_token_id),
        problem_type="regression",
    )


def save_classifier(
    model: RewardModel,
    params: Any,
    path: Any,
    *,
    pad_token_id: int,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: Any = None,
) -> None:
    """Writes the value-head reward model to ``path`` (local or ``gs://``) as an HF sequence
    classifier; ``dtype``, ``max_shard_size`` and ``tokenizer`` as in ``models.save_pretrained``."""
    if model.head_config.kind != "value":
        raise ValueError(
            f"only value heads export as AutoModelForSequenceClassification; this is a "
            f"{model.head_config.kind!r} head (it is saved with the run's checkpoint)"
        )
    decoder = model.decoder.config
    dtype = dtype or decoder.param_dtype
    score = params["head"]["score"]  # [D, K]
    k = int(score.shape[1])
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    head = ExportTensor(
        "score.weight", (k, decoder.hidden_size), lambda: gather_to_host(score, np_dtype).T.copy()
    )
    save_pretrained(
        model.decoder,
        params["decoder"],
        path,
        dtype=dtype,
        max_shard_size=max_shard_size,
        tokenizer=tokenizer,
        lm_head=False,
        extra_tensors=[head],
        config_updates=classifier_config(decoder.to_hf()["architectures"], k, pad_token_id),
    )


def load_classifier(path: str, *, dtype: str = "float32", mesh: Any = None, rules: Any = None) -> RewardModel:
    """An HF sequence-classification directory -> ``RewardModel`` with ``.params`` and ``.pad_token_id``."""
    import os

    from safetensors import safe_open

    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{path}: no config.json (not an exported reward model)")
    with open(config_file) as f:
        hf = json.load(f)
    config = ModelConfig.from_hf(hf, source=config_file, param_dtype=dtype, dtype=dtype)
    decoder = Model(config, mesh=mesh, rules=rules)
    decoder.params = load_params(decoder, path, missing_ok=("lm_head.weight",))  # the classifier has none
    weights = weight_files(path).get("score.weight")
    if weights is None:
        raise ValueError(f"{path}: no 'score.weight' tensor: not a sequence-classification checkpoint")
    with safe_open(weights, framework="numpy") as f:
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
