"""alignjax.reward: reward models on the shared decoder (heads in :mod:`alignjax.models.heads`).

* :mod:`~alignjax.reward.model`: ``RewardModel`` (decoder + head; params ``{"decoder", "head"}``).
* :mod:`~alignjax.reward.train`: objectives ``bt``/``secrets``/``gpm``/``pal`` through the shared train
  loop (the ``reward_model`` job that trains, scores and exports: :mod:`alignjax.jobs.reward_model`).
* :mod:`~alignjax.reward.secrets`: the Secrets-of-RLHF-II pipeline.
* :mod:`~alignjax.reward.evaluate`: RewardBench-format scoring (value/PAL per response, GPM per pair).
* :mod:`~alignjax.reward.export`: HF ``AutoModelForSequenceClassification`` export/import, checkpoint params.
"""
