"""KTO (unpaired desirable / undesirable completions with a batch KL estimate).

python -m alignjax.main --config=experiments/kto.py:runlocal --workdir=workdirs/kto
"""

from experiments import common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, model="tiny", loss="kto", source="", steps=0, runlocal=False)
    c = common.base_config()
    c.model.path = a.model
    if a.source:
        c.data.source = a.source
    c.data.kind = "unpaired"
    c.optim.learning_rate = 5e-4
    c.train.num_steps = 200
    common.fill_loss_hyperparameters(c, a.loss)
    if a.runlocal:
        common.runlocal(c)
    if a.steps:
        c.train.num_steps = a.steps
    return c
