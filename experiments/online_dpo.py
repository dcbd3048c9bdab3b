"""Online (iterative) DPO on the built-in arithmetic task: rounds of sampling from the current policy,
scoring with the verifier (or a reward model), pairing and DPO (alignjax/jobs/online.py).

  python -m alignjax.main --config=experiments/online_dpo.py --workdir=workdirs/online_dpo
  python -m alignjax.main --config=experiments/online_dpo.py:pairs=all,reference=refresh \\
      --workdir=workdirs/online_dpo_all
  python -m alignjax.main --config=experiments/online_dpo.py:runlocal --workdir=/tmp/online_dpo   # seconds
  python -m alignjax.main --config=experiments/online_dpo.py:augmented --workdir=workdirs/online_dpo_ra

Arguments: seed, rounds, prompts (per round), generations, sft_steps, dpo_steps (per round), loss (any
pairwise loss), beta, nll (the chosen answers' NLL weight, RPO), lr, pairs (best_worst | all), reference
(fixed | refresh), augmented (reward-augmented relabelling of each round's pairs, arXiv:2410.08067),
runlocal.
"""

from __future__ import annotations

from alignjax import configs

grpo = configs.sibling(__file__, "grpo")


def get_config(arg: str | None = None):
    a = configs.parse_arg(
        arg, seed=0, rounds=3, prompts=512, generations=8, sft_steps=2500, dpo_steps=20, loss="sigmoid",
        beta=2.0, nll=1.0, lr=4e-4, pairs="best_worst", reference="fixed", augmented=False, runlocal=False,
    )
    c = grpo.base("online_dpo", a)
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
    c.dpo = configs.ConfigDict()
    c.dpo.optim = dict(learning_rate=a.lr, schedule="constant", warmup_steps=0)
    c.dpo.train = dict(num_steps=a.dpo_steps, checkpoint_every=1000)
    if a.runlocal:
        grpo.local(c)
        c.data.batch_size = 8
        c.dpo.train = dict(num_steps=3, checkpoint_every=2)
    return c
