"""The loss-input contract: every array name a loss may take, and how the preference step provides it.

A loss declares its inputs by its signature (``registry``); this table says, for each name, where
the array comes from. The train step implements one function per *source* (not per loss), so a
loss whose inputs are all in :data:`PROVIDERS` trains through the step with no code of its own, and
:func:`status` can say truthfully, from this table alone, whether and on which data a loss trains.

Sources:

- ``sequence``: the summed completion log-prob of each sequence under the policy or the reference
  (``model``), sequences ``0..B-1`` (``part="first"``), ``B..2B-1`` (``"second"``), ``2B..3B-1``
  (``"third"``: the rationale sequences the data layer adds when a loss reads them) or, for listwise
  batches, the ``K`` candidates of each example as ``[B, K]`` (``"candidates"``);
- ``prompt``: the summed log-prob of each sequence's prompt tokens (all but its first; for rows
  whose sides have their own instruction, DOVE's log pi(I)), same parts;
- ``length``: completion token counts (the loss mask), same parts;
- ``token``: per-token log-probs ``[B, T]`` (padded layout: row r holds sequence r);
- ``mask``: the completion mask ``[B, T]``;
- ``distribution``: a statistic of the model's next-token distributions (``stat``), computed by the
  step from the full logits: ``wpo`` (WPO's mean aligned log-prob, no gradient), ``token_kl``
  (the per-token KL of policy from reference, SparsePO's k_t), ``activation_mask`` (SparsePO's
  reward/KL mask from the reference's hidden activations);
- ``head``: one of the policy's auxiliary heads (``head``; ``ModelConfig.aux_heads``, its params
  trained with the policy's) on the hidden states of the ``model`` forward: logits
  ``[B, len(parts), classes]`` of the mean completion state of each sequence of ``parts``, or
  (``per_token``) a mask ``[B, T]`` in [0, 1], the sigmoid of its one output at each token of
  ``part``; ``classes`` is its output count, or ``transform`` maps the provider hyperparameters to it;
- ``column``: a per-example array the data layer puts in the batch (``column``), optionally
  transformed by a pure function of this package (``transform``, with provider hyperparameters
  ``hyper`` read from ``config.loss``);
- ``state``: the loss's own state, threaded through the train state.

``kinds`` are the ``config.data.kind`` values whose batches have the input. Names the step cannot
provide yet are in :data:`PENDING` with what would provide them; a registered loss may take only
names from one of the two tables (or belong to a family trained by its own job, :data:`OWN_JOB`).
This module is pure data: it imports nothing from the model or data layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

PAIRS = ("pairwise", "step")
ALL_KINDS = ("pairwise", "step", "sft", "unpaired", "listwise")
SOURCES = ("sequence", "prompt", "length", "token", "mask", "distribution", "head", "column", "state")
STEP = "the preference step"


@dataclasses.dataclass(frozen=True)
class Provider:
    """How the step computes one loss input (see the module docstring for the fields' values)."""

    source: str
    kinds: tuple[str, ...]
    doc: str
    model: str = "policy"  # sequence/token/distribution: "policy" or "ref"
    part: str = "first"  # "first" | "second" | "third" | "fourth" | "candidates"
    parts: tuple[str, ...] = ()  # head: the sequences it classifies
    column: str = ""
    transform: str = ""  # "module:function" applied to the column(s)
    hyper: tuple[tuple[str, Any], ...] = ()  # provider hyperparameters (config.loss keys) and defaults
    stat: str = ""  # distribution statistic
    per_token: bool = False  # a [B, T] array: padded layout only
    rank: int = 1  # column: 2 = [B, N] (a [B] column is read as N = 1)
    head: str = ""  # head: the aux head's name
    classes: int = 0  # head: its outputs (0: transform(**hyper) gives them)

    @property
    def cacheable(self) -> bool:
        """A reference cache (``config.reference.kind='cache'``) can hold it: reference sums."""
        return self.source == "sequence" and self.model == "ref" and self.part != "candidates"


def _seq(model: str, part: str, kinds: tuple[str, ...], doc: str) -> Provider:
    return Provider("sequence", kinds, doc, model=model, part=part)


def _col(column: str, kinds: tuple[str, ...], doc: str, **kw: Any) -> Provider:
    return Provider("column", kinds, doc, column=column, **kw)


_FIRST = (*PAIRS, "sft")
PROVIDERS: dict[str, Provider] = {
    # -- per-sequence sums of the two forwards
    "chosen_logps": _seq("policy", "first", _FIRST, "policy log-prob of y_w (sft: the completion)"),
    "rejected_logps": _seq("policy", "second", PAIRS, "policy log-prob of y_l"),
    "ref_chosen_logps": _seq("ref", "first", PAIRS, "reference log-prob of y_w (forward or cache)"),
    "ref_rejected_logps": _seq("ref", "second", PAIRS, "reference log-prob of y_l (forward or cache)"),
    "logps": Provider("sequence", ("unpaired", "sft", "listwise"),
                      "policy log-prob of the completion ([B, K] over listwise candidates)"),
    "ref_logps": Provider("sequence", ("unpaired", "sft", "listwise"),
                          "reference log-prob of the completion ([B, K] listwise)", model="ref"),
    "rationale_logps": _seq("policy", "third", PAIRS, "Rationale-DPO: log pi(r | x, y_w > y_l), "
                            "the record's 'rationale' after the prompt and data.rationale_template"),
    "chosen_instruction_logps": Provider("prompt", PAIRS, "DOVE: log pi(I_w), the chosen side's "
                                         "instruction (the record's 'chosen_prompt', else 'prompt')"),
    "rejected_instruction_logps": Provider("prompt", PAIRS, "DOVE: log pi(I_l) ('rejected_prompt', "
                                           "else 'prompt')", part="second"),
    "ref_chosen_instruction_logps": Provider("prompt", PAIRS, "DOVE: log pi_ref(I_w)", model="ref"),
    "ref_rejected_instruction_logps": Provider("prompt", PAIRS, "DOVE: log pi_ref(I_l)",
                                               model="ref", part="second"),
    "kl_logps": _seq("policy", "second", ("unpaired",), "policy log-prob of KTO's mismatched pairs"),
    "ref_kl_logps": _seq("ref", "second", ("unpaired",), "reference log-prob of KTO's mismatched pairs"),
    # -- lengths, token log-probs and masks
    "chosen_lengths": Provider("length", _FIRST, "completion tokens of y_w"),
    "rejected_lengths": Provider("length", PAIRS, "completion tokens of y_l", part="second"),
    "lengths": Provider("length", ("unpaired", "sft", "listwise"), "completion tokens ([B, K] listwise)"),
    "chosen_token_logps": Provider("token", PAIRS, "policy token log-probs of y_w [B, T]", per_token=True),
    "rejected_token_logps": Provider("token", PAIRS, "policy token log-probs of y_l [B, T]", part="second",
                                     per_token=True),
    "ref_chosen_token_logps": Provider("token", PAIRS, "reference token log-probs of y_w [B, T]",
                                       model="ref", per_token=True),
    "ref_rejected_token_logps": Provider("token", PAIRS, "reference token log-probs of y_l [B, T]",
                                         model="ref", part="second", per_token=True),
    "chosen_mask": Provider("mask", PAIRS, "completion mask of y_w [B, T]", per_token=True),
    "rejected_mask": Provider("mask", PAIRS, "completion mask of y_l [B, T]", part="second", per_token=True),
    # -- statistics of the token distributions
    "chosen_wpo_logps": Provider("distribution", PAIRS, "WPO: mean_t(log p_t - log sum_v p_v^2) of y_w "
                                 "under the policy, no gradient", stat="wpo"),
    "rejected_wpo_logps": Provider("distribution", PAIRS, "WPO: the same for y_l", stat="wpo", part="second"),
    "chosen_token_kl": Provider("distribution", PAIRS, "SparsePO k_t = sum_v pi_ref (log pi - log pi_ref) "
                                "on y_w's tokens [B, T]", stat="token_kl", per_token=True),
    "rejected_token_kl": Provider("distribution", PAIRS, "SparsePO k_t on y_l's tokens [B, T]",
                                  stat="token_kl", part="second", per_token=True),
    "chosen_reward_mask": Provider("distribution", PAIRS, "SparsePO mask from the reference's activations "
                                   "on y_w [B, T] in [0, 1]", model="ref", stat="activation_mask",
                                   per_token=True),
    "rejected_reward_mask": Provider("distribution", PAIRS, "SparsePO activation mask on y_l [B, T]",
                                     model="ref", stat="activation_mask", part="second", per_token=True),
    # -- the policy's auxiliary classifiers
    "degree_logits": Provider("head", PAIRS, "SPO: the preference-degree classifier on the policy's mean "
                              "completion state of the degraded chosen and rejected responses, [B, 2, C]",
                              head="spo_degree", parts=("third", "fourth"),
                              transform="alignjax.data.degrees:num_classes", hyper=(("degree_removals", 2),)),
    "chosen_learned_reward_mask": Provider("head", PAIRS, "SparsePO's learned reward mask m^u = "
                                           "sigmoid(w_u . h_ref + b_u) on y_w's tokens [B, T] (the "
                                           "reference's hidden states, the policy's head)", model="ref",
                                           head="sparsepo_reward_mask", classes=1, per_token=True),
    "rejected_learned_reward_mask": Provider("head", PAIRS, "SparsePO's learned reward mask on y_l's tokens",
                                             model="ref", head="sparsepo_reward_mask", classes=1,
                                             per_token=True, part="second"),
    "chosen_learned_kl_mask": Provider("head", PAIRS, "SparsePO's learned KL mask m^d = sigmoid(w_d . "
                                       "h_ref + b_d) on y_w's tokens [B, T]", model="ref",
                                       head="sparsepo_kl_mask",
                                       classes=1, per_token=True),
    "rejected_learned_kl_mask": Provider("head", PAIRS, "SparsePO's learned KL mask on y_l's tokens",
                                         model="ref", head="sparsepo_kl_mask", classes=1, per_token=True,
                                         part="second"),
    # -- per-example columns of the data
    "labels": _col("label", ("unpaired",), "desirable (True) or not: the record's 'label'"),
    "chosen_visits": _col("chosen_visits", ("step",), "MCTS visit count of the chosen step"),
    "rejected_visits": _col("rejected_visits", ("step",), "MCTS visit count of the rejected step"),
    "source_chosen_logps": _col("source_chosen_logps", PAIRS, "InfiFPO: a source model's length-normalised "
                                "log-prob of y_w (the record's 'source_logps'), [B, N]", rank=2),
    "source_rejected_logps": _col("source_rejected_logps", PAIRS, "InfiFPO: the same for y_l, [B, N]",
                                  rank=2),
    "target_probs": _col("scores", ("listwise",), "ADPO soft targets q = softmax(standardise(scores) / "
                         "target_temperature) over the candidates (the record's 'scores')",
                         transform="alignjax.losses.listwise:score_targets",
                         hyper=(("target_temperature", 1.0),)),
    "chosen_win_probs": _col("chosen_probs_win", PAIRS, "GPO/SPPO: P(y_w > pi_t), y_w's probability of "
                             "beating the current policy, in [0, 1] (the record's 'chosen_probs_win', as "
                             "SPPO's and GPO's compute_prob.py write it)"),
    "rejected_win_probs": _col("chosen_probs_lose", PAIRS, "GPO/SPPO: P(y_l > pi_t) (the record's "
                               "'chosen_probs_lose'; need not sum to one with P(y_w > pi_t))"),
    "semantic_distance": _col("semantic_distance", PAIRS, "Sem-DPO: 1 - cos(e(x), e(y_w)) of sentence "
                              "embeddings, computed once (the record's 'semantic_distance'; "
                              "experiments/semantic_distance.py writes it)"),
    "density_weights": _col("prompt_desirable_prob", ("unpaired",), "BCO's UDM weights w = clip(p / (1 - p), "
                            "min_density_ratio, max_density_ratio), p = a prompt classifier's probability "
                            "that the prompt is desirable (the record's 'prompt_desirable_prob')",
                            transform="alignjax.losses.unpaired:bco_density_ratio",
                            hyper=(("min_density_ratio", 0.5), ("max_density_ratio", 10.0))),
    "degree_labels": _col("degree_labels", PAIRS, "SPO: the degraded responses' classes, side * "
                          "(degree_removals + 1) + key phrases removed, [B, 2] (built by the data layer "
                          "from each pair's RAKE key phrases, alignjax.data.degrees)", rank=2),
    "margin": _col("margin", ALL_KINDS, "the record's 'margin'"),
    "score": _col("score", ALL_KINDS, "the record's 'score'"),
    "weight": _col("weight", ALL_KINDS, "the record's 'weight' (1 where absent)"),
    "user_id": _col("user_id", ALL_KINDS, "the record's 'user_id'"),
    # -- the loss's own state
    "state": Provider("state", ALL_KINDS, "the loss's running state (e.g. BCO's reward mean)"),
}

# Names a loss may take that the step does not provide yet, and what would provide each.
PENDING: dict[str, str] = {
    "chosen_probs": "ADPO's pairwise soft target (a per-example column); not batched yet",
    "candidate_mask": "listwise batches have a fixed K per batch: no mask is needed",
    "chosen_kl_mask": "SparsePO's separate KL masks (the step provides the shared mask)",
    "rejected_kl_mask": "SparsePO's separate KL masks (the step provides the shared mask)",
}

# Families trained by their own job (their inputs are a reward head's or a denoiser's outputs).
OWN_JOB: dict[str, str] = {
    "reward": "the reward_model job (experiments/reward_model.py)",
    "diffusion": "its own job (experiments/repro_diffusion2d.py)",
    "policy_gradient": "the online job on its own rollouts (experiments/grpo.py, experiments/rloo.py)",
}


@dataclasses.dataclass(frozen=True)
class Status:
    """Whether and where a loss trains: ``trained_by`` is :data:`STEP`, an :data:`OWN_JOB` entry, or
    "" (nothing trains it yet: ``missing`` names the inputs and :data:`PENDING` what would provide them)."""

    trained_by: str
    kinds: tuple[str, ...]  # data kinds the step trains it on (empty unless trained_by == STEP)
    missing: tuple[str, ...]
    columns: tuple[str, ...]  # data columns its required inputs read

    @property
    def trains(self) -> bool:
        return self.trained_by == STEP


def status(family: str, required: tuple[str, ...]) -> Status:
    """The :class:`Status` of a loss of ``family`` taking the array inputs ``required``."""
    missing = tuple(n for n in required if n not in PROVIDERS)
    columns = tuple(PROVIDERS[n].column for n in required if n in PROVIDERS and PROVIDERS[n].column)
    if family in OWN_JOB:
        return Status(OWN_JOB[family], (), missing, columns)
    if missing:
        return Status("", (), missing, columns)
    kinds = tuple(k for k in ALL_KINDS if all(k in PROVIDERS[n].kinds for n in required))
    return Status(STEP if kinds else "", kinds, missing, columns)


def unknown_inputs(family: str, names: tuple[str, ...]) -> list[str]:
    """Input names in neither table (and not excused by :data:`OWN_JOB`): registration refuses them."""
    if family in OWN_JOB:
        return []
    return [n for n in names if n not in PROVIDERS and n not in PENDING]


def provider_hyperparameters(required: tuple[str, ...]) -> dict[str, Any]:
    """The ``config.loss`` keys the providers of ``required`` read, with their defaults."""
    return {k: v for n in required if n in PROVIDERS for k, v in PROVIDERS[n].hyper}


def what_would_provide(name: str) -> str:
    """One phrase for a refusal message: what would provide input ``name``."""
    if name in PROVIDERS:
        p = PROVIDERS[name]
        return f"data of kind {' or '.join(p.kinds)}" + (f" with column {p.column!r}" if p.column else "")
    return PENDING.get(name, "nothing yet: no provider is declared for it (alignjax/losses/providers.py)")


def describe(required: tuple[str, ...]) -> Mapping[str, str]:
    """name -> a line on where the step gets it (docs)."""
    return {n: PROVIDERS[n].doc if n in PROVIDERS else f"not provided: {PENDING.get(n, '?')}"
            for n in required}
