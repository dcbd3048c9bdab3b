"""KTO (unpaired desirable / undesirable completions with a batch KL estimate).

python -m alignjax.main --config=experiments/kto.py:runlocal --workdir=workdirs/kto

Data: unpaired rows (prompt, completion, label), or preference pairs, which are unpaired as TRL's
``unpair_preference_dataset`` does (chosen: label true, rejected: label false); the built-in
arithmetic pairs without ``source``.
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, model="tiny", loss="kto", source="", steps=0, runlocal=False)
    c = configs.base_config()
    c.model.path = a.model
    if a.source:
        c.data.source = a.source
    else:
        configs.arithmetic_data(c, "arithmetic_dpo")
    c.data.kind = "unpaired"
    c.optim.learning_rate = 5e-4
    c.train.num_steps = 200
    configs.fill_loss_hyperparameters(c, a.loss)
    if a.runlocal:
        configs.runlocal(c)
    if a.steps:
        c.train.num_steps = a.steps
    return c
