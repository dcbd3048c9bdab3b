"""GRPO on the built-in arithmetic task with the verifier as reward, from an SFT model that drops carries
(alignjax/jobs/online.py; "DeepSeekMath", arXiv:2402.03300, with TRL 1.16's loss aggregations).

  python -m alignjax.main --config=experiments/grpo.py --workdir=workdirs/grpo
  python -m alignjax.main --config=experiments/grpo.py:loss_type=dr_grpo,beta=0.04 --workdir=workdirs/dr_grpo
  python -m alignjax.main --config=experiments/grpo.py:runlocal --workdir=/tmp/grpo   # seconds

A learned reward instead of the verifier: ``--config.online.reward=reward_model
--config.online.reward_path=<config.reward.export_dir of experiments/reward_model.py>``.
Arguments: seed, steps, sft_steps, prompts (per step), generations (per prompt), iterations (optimiser
steps per rollout batch), lr, beta (KL coefficient, 0 = no reference), loss_type (grpo | bnpo | dr_grpo |
dapo), scale_rewards (group | batch | none), runlocal.
"""

from __future__ import annotations

from alignjax import configs


def online_section(**overrides) -> configs.ConfigDict:
    """``config.online``: the keys the online jobs read (alignjax/jobs/online.py), with defaults."""
    values = dict(
        num_generations=8,  # completions per prompt (TRL's num_generations)
        max_new_tokens=6,  # TRL's max_completion_length (the arithmetic answer is 3 digits + <eos>)
        temperature=1.0,
        top_p=1.0,
        top_k=0,  # 0 = off
        reward="verifier",  # verifier | reward_model | flr
        reward_path="",  # reward_model: an exported reward model; flr: the LM ("" = the initial policy)
        follow_ups="",  # flr: positive follow-up texts joined by "|"
        negative_follow_ups="",  # flr: negative ones
        verifier="",  # "" = the built-in task data.source names (arithmetic | multistep)
        reward_normalization="none",  # none | batch | group | center
        num_iterations=1,  # optimiser steps per rollout batch (TRL's num_iterations)
        scale_rewards="group",  # GRPO: group | batch | none (Dr. GRPO)
        normalize_advantages=False,  # RLOO: standardise the advantages over the batch
        sft_steps=2500,  # > 0: an SFT stage first (config.sft), the start and the reference
        sft_dir="",  # where the SFT stage runs ("" = <workdir>/sft); another run's finished SFT is reused
        num_test=200,  # held-out prompts for the greedy accuracy before and after
        eval_max_new_tokens=6,
        rounds=3,  # online_dpo: sampling + training rounds
        prompts_per_round=128,  # online_dpo
        pairs="best_worst",  # online_dpo: best_worst | all (every pair with a reward gap, margin = gap)
        reference="fixed",  # online_dpo: fixed (the initial policy) | refresh (each round's start)
        reward_augmented=False,  # online_dpo: reward-augmented relabelling of each round's pairs
        augment_prefix="",  # its string-prompt condition, a format string with {score} ("" = the paper's)
    )
    values.update(overrides)
    return configs.ConfigDict(values)


def base(job: str, a) -> configs.ConfigDict:
    """The config shared by grpo / rloo / online_dpo on the arithmetic task (``a``: parsed arguments)."""
    c = configs.base_config()
    c.job = job
    c.seed = a.seed
    c.model.path = "tiny"
    c.model.overrides = configs.quickstart_model(vocab_size=16)
    configs.arithmetic_data(c, "arithmetic_sft", eval_split="")
    c.data.kind = "sft"
    c.data.max_length = 12
    c.train.log_every = 1
    c.train.checkpoint_every = 25
    c.train.tensorboard = False
    c.train.progress = False
    c.train.plot = False
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.online = online_section()
    c.sft = configs.ConfigDict()
    c.sft.data = dict(kind="sft", source="synthetic:arithmetic_sft:train", eval_source="", batch_size=128)
    c.sft.loss = dict(name="sft", nll_weight=0.0)
    c.sft.reference = dict(kind="none")
    c.sft.optim = dict(learning_rate=3e-3, warmup_steps=50, schedule="cosine")  # the quickstart's SFT
    c.sft.train = dict(num_steps=a.sft_steps, checkpoint_every=1000)
    c.online.sft_steps = a.sft_steps
    return c


def get_config(arg: str | None = None):
    a = configs.parse_arg(
        arg, seed=0, steps=60, sft_steps=2500, prompts=16, generations=8, iterations=1, lr=1e-3, beta=0.0,
        loss_type="dapo", scale_rewards="group", runlocal=False,
    )
    c = rollout_job("grpo", a)
    configs.fill_loss_hyperparameters(c, "grpo")
    c.loss.beta = a.beta
    c.loss.loss_type = a.loss_type
    c.reference.kind = "frozen" if a.beta else "none"
    c.online.scale_rewards = a.scale_rewards
    if a.runlocal:
        local(c)
    return c


def rollout_job(job: str, a) -> configs.ConfigDict:
    """:func:`base` for the jobs that train on each step's rollouts (grpo / rloo / ppo): ``prompts``
    per step, ``generations`` each, ``iterations`` optimiser steps per rollout batch."""
    c = base(job, a)
    c.online.num_generations = a.generations
    c.online.num_iterations = a.iterations
    c.data.batch_size = a.prompts
    c.optim.learning_rate = a.lr
    c.train.num_steps = a.steps
    return c


def local(c: configs.ConfigDict) -> None:
    """The runlocal sizes: a few SFT and online steps of 8 prompts x 4 samples."""
    c.online.sft_steps = 20
    c.sft.train = dict(num_steps=20, checkpoint_every=1000)
    c.sft.data = dict(c.sft.data, batch_size=32)
    c.data.batch_size = 8
    c.online.num_generations = 4
    c.online.num_test = 32
    c.online.prompts_per_round = 16
    c.online.rounds = 2
    c.train.num_steps = 4
    c.train.checkpoint_every = 2
