"""Each reproduction's own parameters (``config.repro``), declared once with their defaults: the
experiment files (``experiments/repro_*.py``) start from :func:`defaults` and change values, and each
reproduction's ``run(config, workdir)`` reads them through :func:`alignjax.repro.common.repro_params`,
which refuses a key not declared here. The defaults are the documented runs' (docs/reproductions.md).

Plain values only: an experiment file imports this module at config time, before JAX loads.
"""

from __future__ import annotations

import copy
from typing import Any

from alignjax import configs


def three_d_losses(beta: float) -> dict[str, dict[str, Any]]:
    """The 3D-properties reproduction's losses at ``beta``: DPO, DPO with a quarter of beta on the
    rejected term, DPO + NLL(y_w)."""
    return {
        "dpo": dict(name="sigmoid", beta=beta, nll_weight=0.0),
        "dpo_split_beta": dict(
            name="dpo_split_beta", beta_chosen=beta, beta_rejected=beta / 4, nll_weight=0.0
        ),
        "dpo_nll": dict(name="sigmoid", beta=beta, nll_weight=1.0),
    }


# The quickstart-sized pipelines (alignjax.repro.common.small_config: SFT, then the preference stage).
RANKING = dict(
    seeds=(0, 1, 2),  # one SFT -> DPO run per seed (model init, data order)
    beta=0.5,  # DPO's beta (also the beta of the idealised bound and of Theorem 4.1's threshold)
    sft_steps=400,  # SFT steps
    pref_steps=150,  # DPO steps from the SFT model (also the frozen reference)
    batch_size=64,  # examples per step, both stages
    learning_rate=1e-3,  # the DPO stage's peak learning rate (cosine, 2 warmup steps)
    num_pairs=512,  # held-out pairs scored (arithmetic_dpo:val, in order)
)

THREE_D = dict(
    seeds=(0, 1, 2),  # one SFT run per seed, every loss from it
    sft_steps=300,  # SFT steps
    pref_steps=100,  # preference steps of each loss
    batch_size=64,  # examples per step, both stages
    learning_rate=1e-3,  # the preference stage's peak learning rate
    num_pairs=512,  # held-out pairs whose log-prob changes are measured
    losses=three_d_losses(0.5),  # name -> a config.loss section, each trained from the SFT model
)

# The tabular synthetic tasks (a policy that is a table of logits, full-batch optimisers).
ADPO_NOISE = dict(
    seeds=(0, 1, 2),  # task and training seeds
    noise_levels=(0.0, 0.1, 0.2, 0.3, 0.4),  # share of training labels flipped
    num_prompts=64,  # P
    num_responses=8,  # K responses per prompt
    pairs_per_prompt=12,  # training pairs per prompt
    score_noise=0.5,  # the scorer behind ADPO's soft targets: s = r + 0.5 xi
    temperature=0.5,  # q = sigmoid((s_w - s_l) / T)
    beta=0.5,  # DPO's beta; ADPO's tau = 1 / beta
    steps=400,  # full-batch Adam steps
    learning_rate=0.05,  # Adam's learning rate
    anchor_every=50,  # adpo_dynamic: steps between re-anchoring at the policy
)

DIFFUSION2D = dict(
    seeds=(0, 1, 2),  # model init, data and sampling seeds
    num_steps=50,  # diffusion steps T
    batch_size=256,  # examples per step (pretraining and DPO)
    pretrain_steps=3000,  # denoiser pretraining steps on the base distribution
    pretrain_lr=1e-3,  # its learning rate
    num_pair_samples=4000,  # samples from the pretrained model that are paired by the preferred region
    dpo_steps=500,  # Diffusion-DPO steps
    dpo_lr=1e-4,  # their learning rate
    beta=50.0,  # Diffusion-DPO's beta
    num_eval_samples=2000,  # samples drawn to measure the preferred share
)

WPO_OFFPOLICY = dict(
    seeds=(0, 1, 2),  # task and training seeds
    rewards=("misspecified", "linear"),  # the reward kinds (misspecified: the policy cannot fit it)
    off_policy_levels=(0.0, 0.5, 0.9),  # share of pairs sampled from another policy
    num_prompts=64,  # prompts
    length=4,  # tokens per response
    vocab=16,  # V
    features=3,  # trainable numbers per prompt (d < V: the policy cannot fit every preference)
    pairs_per_prompt=32,  # training pairs per prompt
    ref_scale=2.0,  # scale of the reference's random logits
    beta=0.5,  # DPO's / WPO's beta
    sweep_betas=(0.1, 2.0),  # on the first reward kind: E[r] gain against KL
    steps=300,  # full-batch Adam steps
    learning_rate=0.05,  # Adam's learning rate
)

SPARSEPO_TOKENS = dict(
    seeds=(0, 1, 2),  # task and training seeds
    num_prompts=64,  # prompts
    length=8,  # tokens per response
    signal_positions=2,  # the first 2 carry the reward; the other 6 are filler
    vocab=8,  # V
    pairs_per_prompt=16,  # training pairs per prompt
    ref_scale=1.0,  # scale of the reference's random logits
    beta=0.5,  # DPO's / SparsePO's beta
    l1_levels=(0.001, 0.01, 0.03, 0.1),  # the learned mask's L1 weight (each of lambda_u, lambda_d)
    steps=300,  # gradient-descent steps
    learning_rate=20.0,  # plain gradient descent on a mean over all pairs (see the module docstring)
)

SEM_DPO_DRIFT = dict(
    seeds=(0, 1, 2),  # task and training seeds
    num_prompts=64,  # prompts (each with a topic embedding)
    num_responses=8,  # responses per prompt
    pairs_per_prompt=24,  # training pairs per prompt
    embed_dim=16,  # embedding dimension
    embed_noise=0.5,  # noise of a response's embedding around its topic
    drift_share=0.3,  # responses on another topic
    drift_bonus=1.0,  # the rater's score bonus for a drifted response
    beta=0.5,  # DPO's / Sem-DPO's beta
    alphas=(1.0, 5.0),  # sem_alpha (the library default is 1.0)
    steps=400,  # full-batch Adam steps
    learning_rate=0.05,  # Adam's learning rate
)

# Reward models on the tiny decoder (experiments/reward_model.py's runlocal config).
SECRETS_NOISE = dict(
    seeds=(0, 1, 2),  # true-reward weights, data and training seeds
    noise_levels=(0.0, 0.15, 0.3),  # share of training labels flipped on top of BT sampling
    num_train=256,  # training pairs
    num_eval=512,  # clean held-out pairs
    steps=400,  # plain BT and the final Secrets-II model (50 epochs of 256 pairs at batch 32)
    ensemble_steps=100,  # each of the 4 ensemble members
    flip_fraction=0.3,  # the lowest-strength share flipped (where the ensemble mean < 0)
    ensemble="models",  # 4 independently trained reward models ("heads": 4 heads on one decoder)
    batch_size=32,  # pairs per step
    learning_rate=3e-3,  # constant learning rate of every reward model
)

# Offline DPO vs online DPO vs GRPO vs PPO (alignjax.recipes' online configs at a matched budget).
ONLINE_VS_OFFLINE = dict(
    seeds=(0, 1, 2),  # one SFT model, its reward models and every arm per seed
    arms=("offline_dpo", "online_dpo", "grpo", "ppo"),  # the methods compared
    rewards=("verifier", "reward_model"),  # the online arms' reward sources (reward_model: one per rm_steps)
    # SFT loss sits on a plateau (~1.15) before it drops; at 600 steps seed 1 had not dropped yet (held-out
    # accuracy 0.13 against seed 0's 0.55).
    sft_steps=1200,  # SFT steps (every arm's start and reference)
    sft_batch_size=128,  # SFT examples per step
    updates=40,  # optimiser steps of every arm
    prompts_per_update=16,  # offline DPO: pairs per step; online arms: prompts per step
    num_generations=8,  # online arms: samples per prompt
    rounds=4,  # online DPO: sampling rounds (updates / rounds steps each)
    ppo_iterations=1,  # PPO epochs per rollout batch (1: one policy update per batch, as the others)
    # Both DPO arms (RPO, lr 4e-4): at the online-DPO experiment's beta 2 both fell below the SFT model on
    # seed 1 (offline 0.476, online 0.076 from 0.548); at beta 0.1, offline 0.676 and online 0.530.
    dpo_beta=0.1,  # both DPO arms' beta
    # experiments/grpo.py's and ppo.py's lr 1e-3 collapsed the policy within a few steps at this size.
    grpo_learning_rate=1e-4,  # GRPO's constant learning rate
    ppo_learning_rate=1e-4,  # PPO's constant learning rate
    num_test=500,  # held-out test prompts (greedy, the verifier)
    # The reward-model quality axis: 400 steps left seed 0's near chance (0.68 held out), 1600 reached 1.0.
    rm_steps=(400, 1600),  # one reward model per entry, trained this many steps
    rm_batch_size=64,  # reward-model pairs per step
    rm_learning_rate=1e-3,  # reward-model learning rate
    rm_num_eval=496,  # held-out pairs of the 500 in arithmetic_dpo:val (a multiple of 8 devices)
    compilation_cache="",  # "" = <workdir>/jax_cache (most programs repeat across arms and seeds), "off"
)

# config.job -> its parameters.
PARAMS: dict[str, dict[str, Any]] = {
    "repro_ranking": RANKING,
    "repro_three_d": THREE_D,
    "repro_adpo_noise": ADPO_NOISE,
    "repro_diffusion2d": DIFFUSION2D,
    "repro_wpo_offpolicy": WPO_OFFPOLICY,
    "repro_sparsepo_tokens": SPARSEPO_TOKENS,
    "repro_sem_dpo_drift": SEM_DPO_DRIFT,
    "repro_secrets_noise": SECRETS_NOISE,
    "repro_online_vs_offline": ONLINE_VS_OFFLINE,
}


def defaults(job: str) -> configs.ConfigDict:
    """A fresh ``config.repro`` section of the reproduction ``job`` (a ``config.job`` name), its
    defaults."""
    if job not in PARAMS:
        raise ValueError(f"{job!r} is not a reproduction; one of {sorted(PARAMS)}")
    return configs.ConfigDict(copy.deepcopy(PARAMS[job]))
