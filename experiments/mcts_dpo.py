"""Iterative MCTS-DPO (arXiv:2405.00451) on the built-in multi-step arithmetic task, and its
instance-level DPO baseline at the same sample budget (see alignjax/jobs/mcts_dpo.py).

  python -m alignjax.main --config=experiments/mcts_dpo.py --workdir=workdirs/mcts_dpo
  python -m alignjax.main --config=experiments/mcts_dpo.py:method=instance,budget_from=workdirs/mcts_dpo \\
      --workdir=workdirs/instance --config.mcts_dpo.sft_dir=workdirs/mcts_dpo/sft
  python -m alignjax.main --config=experiments/mcts_dpo.py:runlocal --workdir=/tmp/mcts   # seconds

A GSM8K-style JSONL: ``--config.data.source=train.jsonl --config.mcts_dpo.test_source=test.jsonl
--config.data.tokenizer=<tokenizer dir> --config.model.path=<HF dir> --config.mcts_dpo.init=<HF dir>``.
Arguments: seed, method (mcts | instance), rounds, prompts, max_operand, drop_rate, sft_steps, dpo_steps,
iterations, children, beta, nll_weight, dpo_lr, budget_from, runlocal. The multi-seed reproduction
(SFT < instance-level DPO < MCTS-DPO, docs/reproductions.md) runs this file's configs:
``experiments/repro_mcts_dpo.py``.
"""

from __future__ import annotations

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(
        arg,
        seed=0,
        method="mcts",
        rounds=3,
        prompts=128,
        max_operand=9,
        drop_rate=0.6,
        sft_steps=600,
        dpo_steps=20,
        iterations=4,
        children=3,
        beta=0.5,
        nll_weight=1.0,
        dpo_lr=1e-4,
        budget_from="",
        runlocal=False,
    )
    c = configs.base_config()
    c.job = "mcts_dpo"
    c.seed = a.seed
    c.model.path = "tiny"
    c.model.overrides = configs.quickstart_model(vocab_size=24)
    c.data.source = "synthetic:multistep"  # or a GSM8K-style JSONL path
    c.data.eval_source = ""
    c.data.tokenizer = "multistep"
    c.data.max_length = 32 if a.max_operand <= 9 else 48
    c.data.batch_size = 64
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.train.tensorboard = False
    c.train.progress = False
    c.train.plot = False

    c.mcts_dpo.method = a.method  # mcts | instance
    c.mcts_dpo.rounds = a.rounds
    c.mcts_dpo.prompts_per_round = a.prompts
    c.mcts_dpo.max_operand = a.max_operand
    c.mcts_dpo.drop_rate = a.drop_rate
    c.mcts_dpo.budget_from = a.budget_from
    c.search.num_iterations = a.iterations
    c.search.num_children = a.children

    c.sft.loss.update(name="sft", nll_weight=0.0)
    c.sft.reference.kind = "none"
    c.sft.optim.update(learning_rate=3e-3, warmup_steps=30, schedule="cosine")
    c.sft.train.num_steps = a.sft_steps

    c.dpo.loss.update(name="mcts_dpo", beta=a.beta, nll_weight=a.nll_weight)
    c.dpo.reference.kind = "frozen"
    c.dpo.optim.update(learning_rate=a.dpo_lr, warmup_steps=5, schedule="cosine")
    c.dpo.train.num_steps = a.dpo_steps
    if a.runlocal:
        c.sft.train.num_steps = 20
        c.dpo.train.num_steps = 4
        c.data.batch_size = 16
        c.mcts_dpo.rounds = 1
        c.mcts_dpo.prompts_per_round = 8
        c.mcts_dpo.num_test = 32
        c.search.num_iterations = 2
    return c
