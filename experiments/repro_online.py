"""Reproduction: offline DPO vs online DPO vs PPO vs GRPO from one SFT model on the arithmetic task, the
verifier or a learned reward model as the reward ("Unpacking DPO and PPO", Ivison et al., arXiv:2406.09279).

  python -m alignjax.main --config=experiments/repro_online.py --workdir=workdirs/repro_online
  python -m alignjax.main --config=experiments/repro_online.py:quick --workdir=/tmp/ro

Arguments: updates (policy updates per arm), prompts (per update), generations (samples per prompt),
quick (one seed, a few steps of every arm and reward).
"""

from alignjax import configs
from alignjax.repro import params


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, updates=40, prompts=16, generations=8, quick=False)
    c = configs.base_config()
    c.job = "repro_online_vs_offline"
    # The reproduction's own parameters (alignjax/repro/params.py), read by its run(config, workdir).
    c.repro = params.defaults(c.job)
    c.repro.updates = a.updates
    c.repro.prompts_per_update = a.prompts
    c.repro.num_generations = a.generations
    if a.quick:
        c.repro.seeds = (0,)
        c.repro.sft_steps, c.repro.sft_batch_size, c.repro.updates = 20, 32, 2
        c.repro.prompts_per_update, c.repro.num_generations, c.repro.rounds = 8, 4, 2
        c.repro.num_test, c.repro.rm_steps, c.repro.rm_batch_size, c.repro.rm_num_eval = 16, (4,), 8, 32
    return c
