"""Built-in synthetic tasks and their character-level tokenizers.

**Arithmetic (the embedded default)**: 2-digit addition ``"ab+cd="`` over all 10,000 pairs
``00..99 + 00..99``; the answer is the 3-digit sum written units-first (``18+25=`` -> ``"340"``),
and the tokenizer appends ``<eos>``: 6 prompt + 4 completion = 10 tokens a sequence. A problem
"needs a carry" when its units digits sum to 10 or more (45% of problems). A seeded permutation
splits 2,000 held-out test prompts, a validation split and the training rest, all disjoint.

* SFT targets carry a consistent bad habit: on carry problems a ``drop_rate`` (0.8) share of
  targets drops the units carry (tens digit computed without it).
* DPO pairs cover both kinds of prompt: carry prompts (chosen correct, rejected carry-dropped) and
  no-carry prompts (chosen correct, rejected with a spurious carry). Carry-only pairs made DPO
  over-generalise to "always carry" (see the quickstart probe).

**Multi-step arithmetic** (for MCTS-DPO): ``"a+b+c="`` with a, b, c in 0..99, solved as the steps
``"a+b=x\\n"``, ``"x+c=y\\n"``, ``"answer y"`` (step delimiter ``"\\n"``); the verifier checks only the
final ``answer y`` line.

**GSM8K-style JSONL**: rows ``{"question", "answer"}`` with the final answer after ``####``.

**Reasoning tasks** (what the MCTS-DPO rounds search and are evaluated on, :class:`Task`): training
and held-out prompts, SFT records and a verifier; the multi-step arithmetic with a carry-dropping SFT
habit (:func:`multistep_task`) or a GSM8K-style JSONL (:func:`gsm8k_task`), by source
(:func:`reasoning_task`).

Tokenizers are real ``tokenizers.Tokenizer`` objects (WordLevel over single characters, special
tokens ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, no BOS added), savable with ``save_pretrained``.
The arithmetic vocabulary is those 3 plus ``0-9 + =``: 15 tokens.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from alignjax.data.readers import read_jsonl
from alignjax.data.schema import REASON_EMPTY, REASON_MISSING, REASON_TYPE, DataError
from alignjax.data.tokenize import ChatTokenizer

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
ARITHMETIC_ALPHABET = "0123456789+="
MULTISTEP_ALPHABET = "0123456789+=\n aenrsw"


def char_tokenizer(alphabet: str) -> ChatTokenizer:
    """WordLevel tokenizer over single characters: ids 0-2 are ``<pad> <bos> <eos>``, then ``alphabet``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: i + len(SPECIAL_TOKENS) for i, ch in enumerate(alphabet)})
    # "<unk>" is deliberately not in the vocabulary: a character outside the alphabet raises.
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return ChatTokenizer(
        tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", extra_config={"model_max_length": 64}
    )


def arithmetic_tokenizer() -> ChatTokenizer:
    return char_tokenizer(ARITHMETIC_ALPHABET)


def multistep_tokenizer() -> ChatTokenizer:
    return char_tokenizer(MULTISTEP_ALPHABET)


TOKENIZERS = {"arithmetic": arithmetic_tokenizer, "multistep": multistep_tokenizer}

# ---------------------------------------------------------------- arithmetic


def arithmetic_prompt(x: int, y: int) -> str:
    return f"{x:02d}+{y:02d}="


def units_first(n: int) -> str:
    """The 3-digit number written units-first: 43 -> "340"."""
    return f"{n:03d}"[::-1]


def needs_carry(x: int, y: int) -> bool:
    return x % 10 + y % 10 >= 10


def arithmetic_answer(x: int, y: int) -> str:
    return units_first(x + y)


def carry_dropped_answer(x: int, y: int) -> str:
    """The bad habit on carry problems: the tens digit ignores the units carry (18+25 -> 33)."""
    return units_first(x + y - 10)


def spurious_carry_answer(x: int, y: int) -> str:
    """A carry where there is none (12+34 -> 56)."""
    return units_first(x + y + 10)


def parse_arithmetic_prompt(prompt: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d\d)\+(\d\d)=", prompt)
    if not m:
        raise ValueError(f"not an arithmetic prompt 'ab+cd=': {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def arithmetic_verify(prompt: str, answer: str) -> bool:
    """True iff ``answer`` (units-first digits, an optional trailing ``<eos>``) is the correct sum."""
    x, y = parse_arithmetic_prompt(prompt)
    answer = answer.strip()
    if answer.endswith("<eos>"):
        answer = answer[: -len("<eos>")]
    return answer == arithmetic_answer(x, y)


def arithmetic_splits(
    seed: int = 0, n_test: int = 2000, n_val: int = 500
) -> dict[str, list[tuple[int, int]]]:
    """All 10,000 problems split disjointly into ``train`` / ``val`` / ``test`` by a seeded permutation."""
    problems = [(x, y) for x in range(100) for y in range(100)]
    order = np.random.default_rng(seed).permutation(len(problems))
    shuffled = [problems[i] for i in order]
    return {
        "test": shuffled[:n_test],
        "val": shuffled[n_test : n_test + n_val],
        "train": shuffled[n_test + n_val :],
    }


def arithmetic_sft_records(
    problems: Sequence[tuple[int, int]], drop_rate: float = 0.8, seed: int = 0
) -> list[dict[str, Any]]:
    """SFT records; on carry problems a ``drop_rate`` share of targets drops the carry (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for x, y in problems:
        bad = needs_carry(x, y) and rng.random() < drop_rate
        out.append(
            {
                "prompt": arithmetic_prompt(x, y),
                "completion": carry_dropped_answer(x, y) if bad else arithmetic_answer(x, y),
            }
        )
    return out


def arithmetic_dpo_records(problems: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """DPO pairs: carry prompts reject the carry-dropped answer, no-carry prompts a spurious carry."""
    out = []
    for x, y in problems:
        rejected = carry_dropped_answer(x, y) if needs_carry(x, y) else spurious_carry_answer(x, y)
        out.append(
            {"prompt": arithmetic_prompt(x, y), "chosen": arithmetic_answer(x, y), "rejected": rejected}
        )
    return out


def arithmetic_eval_records(problems: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """Prompts with their reference answers and carry flag, for greedy-decoding evaluation."""
    return [
        {"prompt": arithmetic_prompt(x, y), "answer": arithmetic_answer(x, y), "carry": needs_carry(x, y)}
        for x, y in problems
    ]


# ---------------------------------------------------------------- multi-step arithmetic


def multistep_problems(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in row) for row in rng.integers(0, 100, size=(n, 3))]


def multistep_splits(
    seed: int = 0, n_train: int = 2000, n_val: int = 200, n_test: int = 200
) -> dict[str, list[tuple[int, int, int]]]:
    """Disjoint train/val/test multi-step problems (distinct triples, seeded)."""
    rng = np.random.default_rng(seed)
    total = n_train + n_val + n_test
    flat = rng.choice(100**3, size=total, replace=False)
    problems = [(int(v // 10000), int(v // 100 % 100), int(v % 100)) for v in flat]
    return {
        "test": problems[:n_test],
        "val": problems[n_test : n_test + n_val],
        "train": problems[n_test + n_val :],
    }


def multistep_prompt(a: int, b: int, c: int) -> str:
    return f"{a}+{b}+{c}="


def multistep_steps(a: int, b: int, c: int) -> list[str]:
    """The reference solution as steps: ``["a+b=x\\n", "x+c=y\\n", "answer y"]``."""
    x = a + b
    return [f"{a}+{b}={x}\n", f"{x}+{c}={x + c}\n", f"answer {x + c}"]


def split_steps(completion: str) -> list[str]:
    """Splits a completion after each ``"\\n"`` (the delimiter stays on its step)."""
    return [s for s in re.split(r"(?<=\n)", completion) if s]


def final_answer(completion: str) -> int | None:
    """The integer on the last ``answer N`` line, else None."""
    found = re.findall(r"answer (-?\d+)", completion)
    return int(found[-1]) if found else None


def multistep_verify(prompt: str, completion: str) -> bool:
    """True iff the completion's final ``answer`` equals the sum of the prompt's numbers."""
    m = re.fullmatch(r"(\d+)\+(\d+)\+(\d+)=", prompt)
    if not m:
        raise ValueError(f"not a multi-step prompt 'a+b+c=': {prompt!r}")
    return final_answer(completion) == sum(int(g) for g in m.groups())


def multistep_sft_records(problems: Sequence[tuple[int, int, int]]) -> list[dict[str, Any]]:
    return [{"prompt": multistep_prompt(*p), "completion": "".join(multistep_steps(*p))} for p in problems]


def multistep_pair_records(problems: Sequence[tuple[int, int, int]], seed: int = 0) -> list[dict[str, Any]]:
    """Pairs whose rejected solution makes an off-by-one..nine error in the first step and carries it on."""
    rng = np.random.default_rng(seed)
    out = []
    for a, b, c in problems:
        x_bad = a + b + int(rng.choice([-1, 1])) * int(rng.integers(1, 10))
        x_bad = x_bad if x_bad >= 0 else a + b + 1
        rejected = f"{a}+{b}={x_bad}\n{x_bad}+{c}={x_bad + c}\nanswer {x_bad + c}"
        out.append(
            {
                "prompt": multistep_prompt(a, b, c),
                "chosen": "".join(multistep_steps(a, b, c)),
                "rejected": rejected,
            }
        )
    return out


# ---------------------------------------------------------------- GSM8K-style


def gsm8k_final(answer: str) -> str | None:
    """The final answer after the last ``####``, commas and ``$`` removed; None when absent."""
    m = re.findall(r"####\s*([^\n]+)", answer)
    if not m:
        return None
    return m[-1].strip().replace(",", "").replace("$", "").rstrip(".")


def _as_number(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def gsm8k_verify(completion: str, reference_final: str) -> bool:
    """Numeric match of the completion's ``####`` answer (else its last number) with the reference."""
    pred = gsm8k_final(completion)
    if pred is None:
        numbers = re.findall(r"-?\d[\d,]*\.?\d*", completion)
        pred = numbers[-1].replace(",", "").rstrip(".") if numbers else None
    a, b = _as_number(pred), _as_number(reference_final)
    return a is not None and b is not None and abs(a - b) < 1e-6


def read_gsm8k(path: str) -> list[dict[str, Any]]:
    """Reads GSM8K-style JSONL to SFT records ``{"prompt", "completion", "final"}``; errors name file:line."""
    out = []
    for where, row in read_jsonl(path):
        if isinstance(row, DataError):
            raise row
        for field in ("question", "answer"):
            if field not in row:
                raise DataError(where, REASON_MISSING, f"missing field {field!r}")
            if not isinstance(row[field], str):
                raise DataError(where, REASON_TYPE, f"field {field!r} must be a string")
        final = gsm8k_final(row["answer"])
        if final is None:
            raise DataError(where, REASON_EMPTY, "field 'answer' has no final answer after '####'")
        out.append({"prompt": row["question"], "completion": row["answer"], "final": final})
    return out


# ---------------------------------------------------------------- reasoning tasks


@dataclasses.dataclass
class Task:
    """Prompts, SFT records and the verifier of one reasoning task.

    ``verify(prompt, completion) -> bool``; ``is_final_step(step_text) -> bool`` marks the answer step.
    """

    train_prompts: list[str]
    test_prompts: list[str]
    sft_records: list[dict[str, Any]]
    verify: Callable[[str, str], bool]
    is_final_step: Callable[[str], bool]


def habit_solution(a: int, b: int, c: int, rng: np.random.Generator, drop_rate: float) -> str:
    """A multi-step solution whose addition steps each drop the units carry with prob. ``drop_rate``.

    ``"a+b=x\\nx+c=y\\nanswer y"``; a dropped carry writes ``x = a + b - 10`` (and likewise for ``y``), and
    the later steps continue consistently from the wrong value: a habit the SFT model learns.
    """
    x = a + b - (10 if needs_carry(a, b) and rng.random() < drop_rate else 0)
    y = x + c - (10 if needs_carry(x, c) and rng.random() < drop_rate else 0)
    return f"{a}+{b}={x}\n{x}+{c}={y}\nanswer {y}"


def multistep_problem_splits(
    max_operand: int, n_test: int, seed: int
) -> dict[str, list[tuple[int, int, int]]]:
    """Disjoint ``train``/``test`` triples with operands in ``0..max_operand`` (99: :func:`multistep_splits`
    with 2,000 training problems)."""
    if max_operand >= 99:
        s = multistep_splits(seed, n_val=0, n_test=n_test)
        return {"train": s["train"], "test": s["test"]}
    m = max_operand + 1
    if n_test >= m**3:
        raise ValueError(f"config.mcts_dpo.num_test={n_test} leaves no training problem among {m**3}")
    order = np.random.default_rng(seed).permutation(m**3)
    problems = [(int(v // (m * m)), int(v // m % m), int(v % m)) for v in order]
    return {"test": problems[:n_test], "train": problems[n_test:]}


def multistep_task(max_operand: int, n_test: int, drop_rate: float, seed: int) -> Task:
    """The multi-step arithmetic task with a carry-dropping SFT habit (:func:`habit_solution`)."""
    splits = multistep_problem_splits(max_operand, n_test, seed)
    rng = np.random.default_rng([seed, 1])
    sft = [
        {"prompt": multistep_prompt(*p), "completion": habit_solution(*p, rng, drop_rate)}
        for p in splits["train"]
    ]
    return Task(
        train_prompts=[multistep_prompt(*p) for p in splits["train"]],
        test_prompts=[multistep_prompt(*p) for p in splits["test"]],
        sft_records=sft,
        verify=multistep_verify,
        is_final_step=lambda s: final_answer(s) is not None,
    )


def gsm8k_task(path: str, test_path: str, n_test: int) -> Task:
    """A GSM8K-style JSONL (``question``/``answer`` with ``#### N``): the verifier compares the final number.

    ``test_path`` = a second JSONL of held-out problems; "" = the last ``n_test`` rows of ``path``.
    """
    rows = read_gsm8k(path)
    test = read_gsm8k(test_path) if test_path else rows[-n_test:]
    train = rows if test_path else rows[:-n_test]
    if not train or not test:
        raise ValueError(
            f"{path}: {len(rows)} rows leave {len(train)} for training and {len(test)} for "
            f"testing (config.mcts_dpo.num_test={n_test}); give more rows or test_source"
        )
    finals = {r["prompt"]: r["final"] for r in train + test}

    def verify(prompt: str, completion: str) -> bool:
        return gsm8k_verify(completion, finals[prompt])

    return Task(
        train_prompts=[r["prompt"] for r in train],
        test_prompts=[r["prompt"] for r in test],
        sft_records=[{"prompt": r["prompt"], "completion": r["completion"]} for r in train],
        verify=verify,
        is_final_step=lambda s: "####" in s,
    )


def reasoning_task(
    source: str,
    *,
    num_test: int,
    max_operand: int = 9,
    drop_rate: float = 0.6,
    split_seed: int = 0,
    test_source: str = "",
) -> Task:
    """The task ``source`` names: ``"synthetic:multistep"`` (:func:`multistep_task` with ``max_operand``,
    ``drop_rate`` and ``split_seed``) or a GSM8K-style JSONL path (:func:`gsm8k_task`, held out:
    ``test_source`` or the last ``num_test`` rows). Errors name ``config.data.source``, where the jobs
    read it."""
    if source.startswith("synthetic:"):
        if not source.startswith("synthetic:multistep"):
            raise ValueError(
                f"config.data.source={source!r}: the MCTS-DPO loop runs on synthetic:multistep "
                "or a GSM8K-style JSONL path"
            )
        return multistep_task(max_operand, num_test, drop_rate, split_seed)
    if not os.path.exists(source):
        raise FileNotFoundError(f"config.data.source={source!r}: no such file (a GSM8K-style JSONL)")
    return gsm8k_task(source, test_source, num_test)


# ---------------------------------------------------------------- registry of built-in sources


def records(name: str, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """Built-in record lists by name: ``arithmetic_sft``, ``arithmetic_dpo`` (splits train/val/test),
    ``multistep_sft``, ``multistep_pairs`` (see ``multistep_splits``)."""
    if name.startswith("arithmetic"):
        problems = arithmetic_splits(seed)[split]
        if name == "arithmetic_sft":
            return arithmetic_sft_records(problems, seed=seed)
        if name == "arithmetic_dpo":
            return arithmetic_dpo_records(problems)
    elif name.startswith("multistep"):
        problems = multistep_splits(seed)[split]
        if name == "multistep_sft":
            return multistep_sft_records(problems)
        if name == "multistep_pairs":
            return multistep_pair_records(problems, seed=seed)
    raise ValueError(
        f"unknown synthetic task {name!r}; known: arithmetic_sft, arithmetic_dpo, multistep_sft, "
        "multistep_pairs"
    )
