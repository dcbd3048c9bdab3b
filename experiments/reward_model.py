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

from alignjax import recipes


def get_config(arg: str | None = None):
    """``alignjax.recipes.reward_model``, which the reproductions build on too."""
    return recipes.reward_model(arg)
