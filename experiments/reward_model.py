"""Reward models on the shared decoder: Bradley-Terry, Secrets of RLHF II, GPM, PAL.

  python -m alignjax.main --config=experiments/reward_model.py:objective=bt,runlocal --workdir=workdirs/rm_bt
  python -m alignjax.main --config=experiments/reward_model.py:objective=secrets,runlocal --workdir=wd/rm_s
  python -m alignjax.main --config=experiments/reward_model.py:objective=gpm,runlocal --workdir=wd/rm_gpm
  python -m alignjax.main --config=experiments/reward_model.py:objective=bt,runlocal,lora=8 --workdir=wd/lora
  python -m alignjax.main --config=experiments/reward_model.py:objective=bt --workdir=workdirs/rm \
      --config.model.path=/ckpt/Qwen2.5-0.5B --config.data.source=/data/pairs.jsonl \
      --config.data.tokenizer=/ckpt/Qwen2.5-0.5B --config.reward.eval_source=/data/rewardbench.jsonl \
      --config.reward.export_dir=workdirs/rm/hf

(``python -m alignjax.reward`` takes the same flags.) Arguments: objective (bt | secrets | gpm | pal),
model, source, eval (a RewardBench-format file scored after training), steps, lora (LoRA rank on the
decoder, 0 = full fine-tuning; the head is trained fully), runlocal.
``objective=secrets`` runs the whole Secrets-II pipeline: an ensemble of ``reward.secrets.ensemble_size``
independently trained reward models (``ensemble="heads"``: value heads on one decoder; ``ensemble_steps``
steps), each pair's strength (mean, std), then flipping / smoothing / adaptive margin (``secrets_rm``)
for ``train.num_steps`` steps.
"""

from alignjax import configs

OBJECTIVE_LOSS = {"bt": "bradley_terry", "secrets": "secrets_rm", "gpm": "gpm", "pal": "pal"}


def get_config(arg: str | None = None):
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
    c.reward = configs.ConfigDict(
        dict(
            objective=a.objective,
            num_heads=1,  # > 1: an ensemble of value heads (bt)
            use_margin=False,  # bt: subtract each row's 'margin' field
            gpm_dim=4,  # 2k
            gpm_prompt_scales=False,
            gpm_normalize=True,  # unit-norm embeddings, as the GPM paper
            pal_dim=16,
            pal_prototypes=2,
            pal_users=1,
            eval_source=a.eval,  # RewardBench-format file, scored at the end
            export_dir="",  # value heads: write an HF AutoModelForSequenceClassification here
        )
    )
    c.reward.secrets = configs.ConfigDict(
        dict(
            ensemble="models",  # models: M independent reward models; heads: M heads on one decoder
            ensemble_size=4,
            ensemble_steps=100,
            flip_fraction=0.1,
            smooth_fraction=0.2,
            score_batch_size=64,
        )
    )
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
