"""``python -m alignjax.reward --config=experiments/reward_model.py:objective=bt --workdir=DIR``.

The same flags, config checks and workdir layout as ``python -m alignjax.main`` (whose flag parsing
this reuses), running the ``reward_model`` job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import app, logging

from alignjax import main as entry


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if entry._WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)
    config = entry._CONFIG.value
    if config.job != "reward_model":
        raise app.UsageError(f"config.job={config.job!r}: python -m alignjax.reward runs job 'reward_model'")
    from alignjax.reward.train import run_reward_model

    entry.validate(config)
    entry.write_config(config, entry._WORKDIR.value)
    summary = run_reward_model(config, entry._WORKDIR.value)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("_")}, indent=1, default=str))


if __name__ == "__main__":
    app.run(_main, flags_parser=entry._parse_flags)
