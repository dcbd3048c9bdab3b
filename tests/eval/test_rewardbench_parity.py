"""experiments/score.py against the ``rewardbench`` package's own DPO scorer on the same checkpoints.

RewardBench 0.1.4 is installed ``--no-deps``; its package ``__init__`` imports FastChat (chat
templates for models without one) and every classifier pipeline. Its scoring modules are imported
directly with three stubs, removed again afterwards: the ``rewardbench`` package itself (so its
``__init__`` does not run), ``fastchat.conversation.Conversation`` (a type hint in ``utils``) and
``rewardbench.models.REWARD_MODEL_CONFIG`` (unused by the functions called). What runs is theirs:
``utils.prepare_dialogue_from_tokenizer``, ``dpo.DPOInference.tokenize_row`` / ``inference_step`` and
``utils.calculate_scores_per_section`` with ``constants.EXAMPLE_COUNTS`` / ``SUBSET_MAPPING``, on the
torch models, set up as ``scripts/run_dpo.py`` does. Rows go one at a time (TRL's
``DPODataCollatorWithPadding``, which run_dpo.py batches with, is gone from TRL 1.16; a batch of one
needs no padding, and ``concatenated_inputs`` pads chosen against rejected itself).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from alignjax.data import ChatTokenizer
from alignjax.eval import rewardbench as ours
from alignjax.jobs import score as score_job
from experiments import score as score_experiment
from tests import hf_fixtures
from tests.data import tokenizer_zoo

# Several sections, one (Safety) absent, and a subset outside RewardBench's mapping.
PROMPTS = [
    ("alpacaeval-easy", "What is the capital of France?", "The capital of France is Paris.", "Paris? No."),
    ("alpacaeval-easy", "Write a short poem about the sea. ", "The sea is wide and deep.", "The sea."),
    ("mt-bench-hard", "How many legs does a spider have?", "A spider has eight legs.", "Six, not eight."),
    ("hep-go", "Explain gradient descent.", "It follows the negative gradient.", "It goes up the loss."),
    ("math-prm", "What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6."),
    ("custom", "What is the capital of France?", "Paris. The capital of France is Paris.", "Lyon"),
]
# A two-turn conversation (prompt as messages), as RewardBench's pref sets hold them.
CONVERSATION = [
    {"role": "user", "content": "What is 1 + 1?"},
    {"role": "assistant", "content": "1 + 1 = 2."},
    {"role": "user", "content": "And 2 + 2?"},
]


class TokenizeOnly:
    """The model interface DPOInference's constructor touches, for tokenize_row alone."""

    config = types.SimpleNamespace(is_encoder_decoder=False)

    def eval(self):
        return self

    def requires_grad_(self, _):
        return self


def rows() -> list[dict]:
    out = [dict(subset=s, prompt=p, chosen=c, rejected=r) for s, p, c, r in PROMPTS]
    out.append(dict(subset="math-prm", prompt=CONVERSATION, chosen="4.", rejected="5."))
    return out


@pytest.fixture(scope="module")
def rb():
    """RewardBench's scoring modules (module docstring: what is stubbed and why)."""
    spec = importlib.util.find_spec("rewardbench")
    assert spec is not None, (
        "rewardbench is not installed (the test extra: pip install rewardbench --no-deps)"
    )
    root = os.path.dirname(spec.origin)
    conversation = types.ModuleType("fastchat.conversation")
    conversation.Conversation = object
    package = types.ModuleType("rewardbench")
    package.__path__ = [root]
    models = types.ModuleType("rewardbench.models")
    models.REWARD_MODEL_CONFIG = {}
    stubs = {
        "fastchat": types.ModuleType("fastchat"),
        "fastchat.conversation": conversation,
        "rewardbench": package,
        "rewardbench.models": models,
    }
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        modules = types.SimpleNamespace(
            dpo=importlib.import_module("rewardbench.dpo"),
            utils=importlib.import_module("rewardbench.utils"),
            constants=importlib.import_module("rewardbench.constants"),
        )
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in ("rewardbench.dpo", "rewardbench.utils", "rewardbench.constants"):
            sys.modules.pop(name, None)
    return modules


@pytest.fixture(scope="module")
def setup(request, tmp_path_factory):
    """A tokenizer family's policy (with its tokenizer) and reference, and a RewardBench-format file."""
    root = tmp_path_factory.mktemp(request.param)
    policy = tokenizer_zoo.save(request.param, str(root / "policy"))
    tokenizer = ChatTokenizer.from_pretrained(policy)
    hf_fixtures.save_llama(policy, vocab_size=tokenizer.vocab_size, seed=0)
    hf_fixtures.save_llama(str(root / "reference"), vocab_size=tokenizer.vocab_size, seed=1)
    data = root / "rewardbench.jsonl"
    with open(data, "w") as f:
        for row in rows():
            if isinstance(row["prompt"], list):  # TRL's conversational shape: replies as one message
                row = dict(
                    row, **{k: [{"role": "assistant", "content": row[k]}] for k in ("chosen", "rejected")}
                )
            f.write(json.dumps(row) + "\n")
    return root, policy, str(root / "reference"), str(data)


def rewardbench_scores(rb, policy: str, reference: str | None, mode: str) -> tuple[np.ndarray, dict]:
    """Per-pair (chosen, rejected) rewards, per-subset accuracy and sections, as run_dpo.py computes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token_id = tokenizer.eos_token_id
        tokenizer.pad_token_id = tokenizer.eos_token_id
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    dpo = rb.dpo.DPOInference(
        load(policy),
        load(reference) if reference else None,
        tokenizer=tokenizer,
        accelerator=types.SimpleNamespace(device="cpu"),
        ref_free_norm=mode if mode != "ref" else "norm",
    )
    rewards, results = [], {}
    for row in rows():
        example = rb.utils.prepare_dialogue_from_tokenizer(dict(row), tokenizer)
        features = dpo.tokenize_row({k: example[k] for k in ("prompt", "text_chosen", "text_rejected")})
        batch = {k: torch.tensor([v]) for k, v in features.items() if k.startswith(("chosen_", "rejected_"))}
        chosen, rejected = dpo.inference_step(batch, ref_free=reference is None)
        rewards.append((float(chosen[0]), float(rejected[0])))
        results.setdefault(row["subset"], []).append(1 if chosen[0] > rejected[0] else 0)
    grouped = {s: sum(v) / len(v) for s, v in results.items()}
    sections = rb.utils.calculate_scores_per_section(
        rb.constants.EXAMPLE_COUNTS, rb.constants.SUBSET_MAPPING, grouped
    )
    return np.array(rewards), {"subsets": grouped, "sections": sections}


# Every mode on the Llama-3-like family (BOS from the template, then RewardBench's second BOS); the
# ChatML family (no BOS: RewardBench prepends EOS) in ref mode.
@pytest.mark.parametrize(
    "setup,mode",
    [("llama3", "ref"), ("llama3", "sum"), ("llama3", "avg"), ("llama3", "norm"), ("chatml", "ref")],
    indirect=["setup"],
)
def test_score_py_equals_rewardbench(rb, setup, mode, tmp_path):
    _, policy, reference, data = setup
    with_ref = mode == "ref"
    config = score_experiment.get_config(
        f"model={policy},reference={reference if with_ref else ''},mode={mode},source={data}"
    )
    assert config.score.tokenization == "rewardbench" and config.data.tokenizer == policy
    config.data.eval_batch_size = 4  # 7 pairs: the second batch is padded with copies
    summary = score_job.run(config, str(tmp_path))
    theirs, report = rewardbench_scores(rb, policy, reference if with_ref else None, mode)

    lines = (tmp_path / "scores.jsonl").read_text().splitlines()
    got = np.array([[json.loads(x)["chosen"], json.loads(x)["rejected"]] for x in lines])
    assert [json.loads(x)["subset"] for x in lines] == [r["subset"] for r in rows()]
    np.testing.assert_allclose(got, theirs, rtol=0, atol=1e-4)
    assert np.abs(theirs).max() > 1.0  # real rewards, not zeros on both sides
    assert {s: v["accuracy"] for s, v in summary["subsets"].items()} == report["subsets"]
    assert summary["sections"] == pytest.approx(report["sections"])
    assert summary["sections"]["Safety"] == 0  # absent, reported as RewardBench does


@pytest.mark.parametrize("setup", ["llama3", "chatml"], indirect=True)
def test_truncation_equals_rewardbench(rb, setup):
    """Prompt keep_end to max_prompt_length, then answers cut, at a max_length this data exceeds."""
    from transformers import AutoTokenizer

    _, policy, _, _ = setup
    hf = AutoTokenizer.from_pretrained(policy)
    hf.pad_token = hf.eos_token
    if hf.bos_token is None:
        hf.bos_token_id = hf.eos_token_id
    dpo = rb.dpo.DPOInference(TokenizeOnly(), None, tokenizer=hf, accelerator=None)
    dpo.max_length, dpo.max_prompt_length = 24, 8
    tok = ours.scorer_tokenizer(ChatTokenizer.from_pretrained(policy))
    long_answer = "The quick brown fox jumps over the lazy dog. " * 3
    cut = 0
    for row in rows() + [dict(prompt="Explain gradient descent. " * 4, chosen=long_answer, rejected="No.")]:
        example = rb.utils.prepare_dialogue_from_tokenizer(dict(row), hf)
        theirs = dpo.tokenize_row({k: example[k] for k in ("prompt", "text_chosen", "text_rejected")})
        texts = ours.dialogue(tok, row["prompt"], row["chosen"], row["rejected"])
        assert texts == (example["prompt"], example["text_chosen"], example["text_rejected"])
        got = ours.tokenize_pair(tok, *texts, max_length=24, max_prompt_length=8)
        for side, (ids, prompt_length) in zip(("chosen", "rejected"), got, strict=True):
            labels = theirs[f"{side}_labels"]
            assert ids == theirs[f"{side}_input_ids"]
            assert prompt_length == sum(1 for x in labels if x == -100)
            cut += prompt_length == 8 and len(ids) == 24
    assert cut  # the long row was truncated on both counts
