"""Reward-augmented relabelling equals the authors' scripts/reward_augmentation.py
(shenao-zhang/reward-augmented-preference at 058a5def), whose functions are ported below unchanged
(the dataset filter and concatenation as lists); their rows hold the prompt inside chosen/rejected."""

import copy

import pytest

from alignjax.online import relabel


# ---- ported from scripts/reward_augmentation.py ----------------------------------------------------
def system_prompt(overall_score):
    overall_score = int(overall_score) if int(overall_score) == overall_score else overall_score
    system_content = \
f"""You are an assistant that generates responses for the instruction while implicitly achieving the following target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):
Overall score: {overall_score}."""  # noqa: E501
    return system_content


def add_pos_goal(example):
    overall_score = example["overall_score_chosen"]
    system_msg = {"content": system_prompt(overall_score), "role": "system"}
    example["chosen"].insert(0, system_msg)
    example["rejected"].insert(0, system_msg)
    return example


def add_neg_goal(example):
    overall_score = example["overall_score_rejected"]
    system_msg = {"content": system_prompt(overall_score), "role": "system"}
    gc_chosen = [system_msg] + example["rejected"]
    gc_rejected = [system_msg] + example["chosen"]
    example["chosen"] = gc_chosen
    example["rejected"] = gc_rejected
    return example
# ------------------------------------------------------------------------------------------------------


ROWS = [("What is 2+2?", "4", "5", 9.0, 3.0), ("Name a colour.", "Blue.", "Tree.", 7.5, 7.5),
        ("Say hi.", "Bye.", "Hi!", 2.0, 8.0), ("Count to 3.", "1 2 3", "1 2", 10.0, 6.5)]


def _ours():
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}], "score_chosen": sc, "score_rejected": sr}
            for p, c, r, sc, sr in ROWS]


def _theirs():
    out = []
    for p, c, r, sc, sr in ROWS:
        user = {"role": "user", "content": p}
        out.append({"chosen": [user, {"role": "assistant", "content": c}],
                    "rejected": [user, {"role": "assistant", "content": r}],
                    "overall_score_chosen": sc, "overall_score_rejected": sr,
                    "avg_fine_score_chosen": sc, "avg_fine_score_rejected": sr})
    kept = [x for x in out if x["avg_fine_score_chosen"] >= x["avg_fine_score_rejected"]]
    return [add_pos_goal(copy.deepcopy(x)) for x in kept] + [add_neg_goal(copy.deepcopy(x)) for x in kept]


def test_relabel_equals_the_authors_script():
    ours, theirs = relabel.relabel(_ours()), _theirs()
    assert len(ours) == len(theirs) == 6  # the pair whose chosen scored lower is dropped
    for o, t in zip(ours, theirs):
        assert o["prompt"] + o["chosen"] == t["chosen"]
        assert o["prompt"] + o["rejected"] == t["rejected"]
        assert set(o) == {"prompt", "chosen", "rejected"}


def test_string_prompts_and_errors():
    rows = [{"prompt": "12+34=", "chosen": "64", "rejected": "65", "score_chosen": 1, "score_rejected": 0}]
    out = relabel.relabel(rows)
    assert out[0]["prompt"] == system_prompt(1) + "\n\n12+34=" and out[0]["chosen"] == "64"
    assert out[1]["prompt"] == system_prompt(0) + "\n\n12+34=" and out[1]["chosen"] == "65"
    with pytest.raises(ValueError, match="record 0: no 'score_rejected'"):
        relabel.relabel([{"prompt": "x", "chosen": "a", "rejected": "b", "score_chosen": 1}])
