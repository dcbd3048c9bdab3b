"""alignjax.jobs: what ``python -m alignjax.main`` runs, one module per job family.

Each module's ``run(config, workdir)`` is a job as the entry point dispatches it: it reads the
config's sections, strings the library's pieces together (training, scoring, search, export) and
writes the job's outputs, returning its summary (the ``train`` job: a
:class:`alignjax.train.result.TrainResult`). The reusable pieces stay in the library packages; this is
the top layer, which only :mod:`alignjax.main` and :mod:`alignjax.repro` import. The paper
reproductions are jobs too, registered here from :mod:`alignjax.repro`.

This package's ``__init__`` imports nothing, so that the entry point reads :data:`JOBS` (and answers
a usage error) before JAX loads.
"""

# job -> "module:function(config, workdir) -> summary", imported on demand so that a job pays only
# for what it uses.
JOBS = {
    "train": "alignjax.jobs.train:run",
    "quickstart": "alignjax.jobs.quickstart:run",
    "score": "alignjax.jobs.score:run",
    "source_logps": "alignjax.jobs.annotate:run",
    "semantic_distance": "alignjax.jobs.annotate:run",
    "prompt_classifier": "alignjax.jobs.annotate:run",
    "reward_model": "alignjax.jobs.reward_model:run",
    "mcts_dpo": "alignjax.jobs.mcts_dpo:run",
    "grpo": "alignjax.jobs.online:run",
    "rloo": "alignjax.jobs.online:run",
    "online_dpo": "alignjax.jobs.online:run",
    "ppo": "alignjax.jobs.online:run",
    "repro_ranking": "alignjax.repro.ranking:run",
    "repro_adpo_noise": "alignjax.repro.adpo_noise:run",
    "repro_three_d": "alignjax.repro.three_d:run",
    "repro_diffusion2d": "alignjax.repro.diffusion2d:run",
    "repro_wpo_offpolicy": "alignjax.repro.wpo_offpolicy:run",
    "repro_sparsepo_tokens": "alignjax.repro.sparsepo_tokens:run",
    "repro_sem_dpo_drift": "alignjax.repro.sem_dpo_drift:run",
    "repro_secrets_noise": "alignjax.repro.secrets_noise:run",
    "repro_online_vs_offline": "alignjax.repro.online_vs_offline:run",
    "repro_mcts_dpo": "alignjax.repro.mcts_dpo:run",
}
