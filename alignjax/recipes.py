"""The configs of the experiments the library builds on: the quickstart, the online jobs (GRPO, PPO,
online DPO) and the reward model. ``experiments/<name>.py``'s ``get_config(arg)`` returns
``recipes.<name>(arg)`` and the reproductions call the same functions with their own arguments, so an
experiment and a reproduction of it cannot drift apart, and the library never reads a file under
``experiments/``. Each experiment file's docstring keeps its launch commands and why its values were
chosen.

Loading this module imports no JAX (config files load before JAX does); building a config that fills
a loss's hyperparameters imports the loss registry.
"""

from __future__ import annotations

from alignjax import configs

ConfigDict = configs.ConfigDict

# ----------------------------------------------------------------------------- the quickstart


def quickstart(arg: str | None = None) -> ConfigDict:
    """``experiments/quickstart.py``: SFT on 2-digit addition, then DPO (default RPO) from it.

    Arguments: seed, loss (any pairwise loss), beta (0 = 2 for RPO, 5 for plain DPO), rpo, sft_steps,
    dpo_steps, dpo_lr (0 = 4e-4 for RPO, 1e-4 for plain DPO), runlocal.
    """
    a = configs.parse_arg(
        arg,
        seed=0,
        loss="sigmoid",
        beta=0.0,
        rpo=True,
        sft_steps=2500,
        dpo_steps=300,
        dpo_lr=0.0,
        runlocal=False,
    )
    c = configs.base_config()
    c.job = "quickstart"
    c.seed = a.seed
    c.model.path = "tiny"
    c.model.overrides = configs.quickstart_model(vocab_size=16)
    c.data.tokenizer = "arithmetic"
    c.data.max_length = 10
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.data.num_eval = 500
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.tensorboard = False

    # Stage overrides (of the shared keys above).
    c.sft.data.update(kind="sft", source="synthetic:arithmetic_sft:train", eval_source="")
    c.sft.loss.update(name="sft", nll_weight=0.0)
    c.sft.reference.kind = "none"
    c.sft.optim.update(learning_rate=3e-3, warmup_steps=50, schedule="cosine", weight_decay=0.0)
    c.sft.train.num_steps = a.sft_steps

    c.dpo.data.update(
        kind="pairwise", source="synthetic:arithmetic_dpo:train", eval_source="synthetic:arithmetic_dpo:val"
    )
    beta = a.beta or (2.0 if a.rpo else 5.0)
    c.dpo.loss.update(name=a.loss, beta=beta, nll_weight=1.0 if a.rpo else 0.0)
    c.dpo.reference.kind = "frozen"
    dpo_lr = a.dpo_lr or (4e-4 if a.rpo else 1e-4)
    c.dpo.optim.update(learning_rate=dpo_lr, warmup_steps=20, schedule="cosine")
    # Evaluated on the validation pairs every 25 steps: the evaluation curve of curves.png.
    c.dpo.train.update(num_steps=a.dpo_steps, eval_every=25)
    if a.runlocal:
        c.sft.train.num_steps = 30
        c.dpo.train.update(num_steps=10, eval_every=5)
        c.data.batch_size = 32
        c.quickstart.num_test = 200
        c.quickstart.num_val = 100
        c.data.num_eval = 96
        c.data.eval_batch_size = 96  # a multiple of every data-parallel size up to 8 devices
    return c


# ----------------------------------------------------------------------------- the online jobs


def online_base(job: str, a: ConfigDict) -> ConfigDict:
    """The config shared by grpo / rloo / ppo / online_dpo on the arithmetic task (``a``: parsed
    arguments with ``seed`` and ``sft_steps``)."""
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
    c.sft.data.update(kind="sft", source="synthetic:arithmetic_sft:train", eval_source="", batch_size=128)
    c.sft.loss.update(name="sft", nll_weight=0.0)
    c.sft.reference.kind = "none"
    c.sft.optim.update(learning_rate=3e-3, warmup_steps=50, schedule="cosine")  # the quickstart's SFT
    c.sft.train.update(num_steps=a.sft_steps, checkpoint_every=1000)
    c.online.sft_steps = a.sft_steps
    return c


def rollout_job(job: str, a: ConfigDict) -> ConfigDict:
    """:func:`online_base` for the jobs that train on each step's rollouts (grpo / rloo / ppo):
    ``prompts`` per step, ``generations`` each, ``iterations`` optimiser steps per rollout batch."""
    c = online_base(job, a)
    c.online.num_generations = a.generations
    c.online.num_iterations = a.iterations
    c.data.batch_size = a.prompts
    c.optim.learning_rate = a.lr
    c.train.num_steps = a.steps
    return c


def online_local(c: ConfigDict) -> None:
    """The runlocal sizes: a few SFT and online steps of 8 prompts x 4 samples."""
    c.online.sft_steps = 20
    c.sft.train.update(num_steps=20, checkpoint_every=1000)
    c.sft.data.batch_size = 32
    c.data.batch_size = 8
    c.online.num_generations = 4
    c.online.num_test = 32
    c.online.prompts_per_round = 16
    c.online.rounds = 2
    c.train.num_steps = 4
    c.train.checkpoint_every = 2


def grpo(arg: str | None = None) -> ConfigDict:
    """``experiments/grpo.py``: GRPO with the verifier as reward, from an SFT model that drops carries.

    Arguments: seed, steps, sft_steps, prompts (per step), generations (per prompt), iterations
    (optimiser steps per rollout batch), lr, beta (KL coefficient, 0 = no reference), loss_type (grpo |
    bnpo | dr_grpo | dapo), scale_rewards (group | batch | none), runlocal.
    """
    a = configs.parse_arg(
        arg,
        seed=0,
        steps=60,
        sft_steps=2500,
        prompts=16,
        generations=8,
        iterations=1,
        lr=1e-3,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        runlocal=False,
    )
    c = rollout_job("grpo", a)
    configs.fill_loss_hyperparameters(c, "grpo")
    c.loss.beta = a.beta
    c.loss.loss_type = a.loss_type
    c.reference.kind = "frozen" if a.beta else "none"
    c.online.scale_rewards = a.scale_rewards
    if a.runlocal:
        online_local(c)
    return c


def ppo(arg: str | None = None) -> ConfigDict:
    """``experiments/ppo.py``: PPO with a value head, the verifier as reward.

    Arguments: seed, steps, sft_steps, prompts (per step), generations (per prompt), iterations (PPO
    epochs per rollout batch), lr, kl_coef, whiten (whiten the token rewards), runlocal.
    """
    a = configs.parse_arg(
        arg,
        seed=0,
        steps=60,
        sft_steps=2500,
        prompts=16,
        generations=4,
        iterations=2,
        lr=1e-3,
        kl_coef=0.05,
        whiten=False,
        runlocal=False,
    )
    # PPO's loss keys come from its module (which loads JAX) only when a PPO config is built.
    from alignjax.online.ppo import HYPERPARAMETERS

    c = rollout_job("ppo", a)
    c.loss.name = "ppo"
    for key, value in HYPERPARAMETERS.items():
        c.loss[key] = value
    c.loss.kl_coef = a.kl_coef
    c.loss.whiten_rewards = a.whiten
    c.reference.kind = "frozen"
    if a.runlocal:
        online_local(c)
    return c


def online_dpo(arg: str | None = None) -> ConfigDict:
    """``experiments/online_dpo.py``: rounds of sampling from the current policy, scoring, pairing, DPO.

    Arguments: seed, rounds, prompts (per round), generations, sft_steps, dpo_steps (per round), loss
    (any pairwise loss), beta, nll (the chosen answers' NLL weight, RPO), lr, pairs (best_worst | all),
    reference (fixed | refresh), augmented (reward-augmented relabelling of each round's pairs), runlocal.
    """
    a = configs.parse_arg(
        arg,
        seed=0,
        rounds=3,
        prompts=512,
        generations=8,
        sft_steps=2500,
        dpo_steps=20,
        loss="sigmoid",
        beta=2.0,
        nll=1.0,
        lr=4e-4,
        pairs="best_worst",
        reference="fixed",
        augmented=False,
        runlocal=False,
    )
    c = online_base("online_dpo", a)
    configs.fill_loss_hyperparameters(c, a.loss)
    if "beta" in c.loss:
        c.loss.beta = a.beta
    # The quickstart's tuned offline setting (RPO: DPO at beta 2 + the chosen answers' NLL, lr 4e-4): at
    # beta 0.1 / lr 1e-3 without the NLL term the chosen log-probs collapsed (0.545 -> 0.06 accuracy).
    c.loss.nll_weight = a.nll
    c.online.rounds = a.rounds
    c.online.prompts_per_round = a.prompts
    c.online.num_generations = a.generations
    c.online.pairs = a.pairs
    c.online.reference = a.reference
    c.online.reward_augmented = a.augmented
    c.online.augment_prefix = "{score}+"  # the arithmetic alphabet has no letters: "1+" / "0+" first
    c.data.batch_size = 32
    c.dpo.optim.update(learning_rate=a.lr, schedule="constant", warmup_steps=0)
    c.dpo.train.update(num_steps=a.dpo_steps, checkpoint_every=1000)
    if a.runlocal:
        online_local(c)
        c.data.batch_size = 8
        c.dpo.train.update(num_steps=3, checkpoint_every=2)
    return c


# ----------------------------------------------------------------------------- the reward model

OBJECTIVE_LOSS = {"bt": "bradley_terry", "secrets": "secrets_rm", "gpm": "gpm", "pal": "pal"}


def reward_model(arg: str | None = None) -> ConfigDict:
    """``experiments/reward_model.py``: Bradley-Terry, Secrets of RLHF II, GPM or PAL reward models.

    Arguments: objective (bt | secrets | gpm | pal), model, source, eval (a RewardBench-format file
    scored after training), steps, lora (LoRA rank on the decoder, 0 = full fine-tuning), runlocal.
    """
    a = configs.parse_arg(
        arg, objective="bt", model="tiny", source="", eval="", steps=0, lora=0, runlocal=False
    )
    if a.objective not in OBJECTIVE_LOSS:
        raise ValueError(
            f"experiments/reward_model.py: objective={a.objective!r}; choose one of {sorted(OBJECTIVE_LOSS)}"
        )
    c = configs.base_config()
    c.job = "reward_model"
    c.model.path = a.model
    if a.source:
        c.data.source = a.source
    else:
        configs.arithmetic_data(c, "arithmetic_dpo")
    c.data.kind = "pairwise"
    c.reference.kind = "none"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10
    c.train.num_steps = 200
    c.reward.objective = a.objective
    c.reward.eval_source = a.eval
    if a.objective == "pal":
        c.loss.name = "pal"  # the reward scale is the head's learned parameter
    else:
        configs.fill_loss_hyperparameters(c, OBJECTIVE_LOSS[a.objective])
    if a.runlocal:
        configs.runlocal(c)
        c.reward.secrets.ensemble_steps = 5
        c.reward.secrets.score_batch_size = 32
    if a.steps:
        c.train.num_steps = a.steps
    c.model.lora.rank = a.lora
    return c
