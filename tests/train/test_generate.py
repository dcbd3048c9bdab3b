"""Greedy task accuracy (KV-cache decoding) against an independent full-recompute argmax loop."""

import jax
import numpy as np

from alignjax import models
from alignjax.data import synthetic
from alignjax.eval.task_accuracy import task_accuracy


def _full_recompute_greedy(model, params, prompt_ids, max_new_tokens, eos):
    ids = list(prompt_ids)
    apply = jax.jit(model.apply)
    out = []
    for _ in range(max_new_tokens):
        logits = np.asarray(apply(params, np.array([ids], np.int32)))[0, -1]
        nxt = int(np.argmax(logits))
        if nxt == eos:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_task_accuracy_decodes_what_full_recomputation_decodes():
    tokenizer = synthetic.arithmetic_tokenizer()
    model = models.Model(models.PRESETS["tiny"].replace(vocab_size=tokenizer.vocab_size))
    params = model.init(jax.random.PRNGKey(3))
    records = synthetic.arithmetic_eval_records(synthetic.arithmetic_splits(0)["test"][:12])
    expected = {
        r["prompt"]: tokenizer.decode(
            _full_recompute_greedy(model, params, tokenizer.encode_prompt(r["prompt"]), 4, tokenizer.eos_id)
        )
        for r in records
    }
    seen = {}

    first = records[0]["prompt"]

    def verify(prompt, answer):
        seen[prompt] = answer
        return answer == expected[prompt] and prompt != first  # one deliberate failure, to be counted
    result = task_accuracy(model, params, tokenizer, records, verify, max_new_tokens=4, group_key="carry",
                           batch_size=5)
    assert seen == expected
    assert result["accuracy"] == (len(records) - 1) / len(records)
    carry = [r["carry"] for r in records]
    first_group = f"accuracy/carry={records[0]['carry']}"
    n_first = sum(c == records[0]["carry"] for c in carry)
    assert result[first_group] == (n_first - 1) / n_first
