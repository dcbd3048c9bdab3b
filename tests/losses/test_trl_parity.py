"""alignjax's TRL-named losses against TRL 1.16's own DPO loss code, executed (not restated).

``DPOTrainer._compute_loss`` is called unbound on a stand-in ``self`` that carries only the attributes
the method reads (loss types, beta, f-divergence, label smoothing, an accelerator whose gathers are the
identity) and a stand-in model that returns given per-token log-probs in the fused-LM-head output
fields TRL reads. Reference log-probs go in precomputed (``precompute_ref_logps``), so no reference
model runs. Everything between the log-probs and the loss, i.e. the f-divergence transform and every
``loss_type`` branch, is TRL's code as installed.

TRL returns the batch mean, so per-example losses come from one call per example (B = 1); the
batch-coupled AOT losses are compared as batch means. Rewards are TRL's logged ``rewards/*`` metrics.
"""

from __future__ import annotations

import types
from collections import defaultdict

import numpy as np
import pytest
import torch

from alignjax import losses

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

# Every TRL loss_type alignjax registers (TRL's `sft` is a batch-level token mean, not a pair loss).
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
# TRL 1.16 DPOTrainer.__init__ refuses any other f_divergence_type for the remaining loss types
# (dpo_trainer.py, `f_divergence_loss_types`): their branches use the raw log-ratios.
TRL_F_DIVERGENCE_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
BATCH_COUPLED = {"aot", "aot_unpaired"}
B, T = 8, 7
BETA, EPS, ALPHA, TAU = 0.3, 0.2, 0.3, 0.07


class _StandInModel(torch.nn.Module):
    """Returns fixed per-token log-probs as the fused-LM-head output TRL's ``_compute_loss`` reads."""

    def __init__(self, token_logps: torch.Tensor):
        super().__init__()
        self.token_logps = token_logps

    def forward(self, **_):
        lp = self.token_logps
        zeros = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _batch(seed: int):
    """Random policy token log-probs, completion masks and reference sequence log-probs (float32)."""
    r = np.random.default_rng(seed)
    lengths = r.integers(1, T, 2 * B)  # completion tokens after one prompt token
    completion = (np.arange(T)[None] >= T - lengths[:, None]).astype(np.int64)
    shift = completion[:, 1:]
    token = -r.uniform(0.05, 1.5, (2 * B, T - 1)) * shift
    logps = token.sum(1)
    ref = logps + r.normal(0.0, 1.5, 2 * B)
    return {"token": token.astype(np.float32), "completion": completion, "logps": logps.astype(np.float32),
            "ref": ref.astype(np.float32), "lengths": completion.sum(1)}


def _trl(data, rows, loss_type: str, f_div: str) -> tuple[float, dict[str, float]]:
    """TRL 1.16's loss and reward metrics for the pairs ``rows`` (chosen rows i, rejected rows B + i)."""
    idx = np.concatenate([rows, B + np.asarray(rows)])
    token = torch.tensor(data["token"][idx])
    completion = torch.tensor(data["completion"][idx])
    ref = torch.tensor(data["ref"][idx])
    n = len(rows)
    trainer = types.SimpleNamespace(
        model=_StandInModel(token),
        accelerator=types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, ref_model=None,
        f_divergence_type=f_div, f_alpha_divergence_coef=ALPHA, loss_types=[loss_type], loss_weights=[1.0],
        beta=BETA, label_smoothing=EPS, use_weighting=False, args=types.SimpleNamespace(discopop_tau=TAU),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    with torch.no_grad():
        loss = trl_dpo.DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return float(loss), metrics


def _hyper(name: str, loss_type: str, f_div: str) -> dict:
    hyper = losses.spec(name).hyperparameters
    out = {"beta": BETA}
    if "label_smoothing" in hyper and loss_type != "sigmoid":  # TRL 1.16's sigmoid ignores it (see below)
        out["label_smoothing"] = EPS
    if loss_type == "discopop":
        out["tau"] = TAU
    if f_div != "reverse_kl" and loss_type in TRL_F_DIVERGENCE_TYPES:
        out.update(f_divergence=f_div, f_alpha=ALPHA)
    return out


def _ours(data, loss_type: str, f_div: str) -> np.ndarray:
    w, lo = slice(0, B), slice(B, 2 * B)
    arrays = {"chosen_logps": data["logps"][w], "rejected_logps": data["logps"][lo],
              "ref_chosen_logps": data["ref"][w], "ref_rejected_logps": data["ref"][lo],
              "chosen_lengths": data["lengths"][w], "rejected_lengths": data["lengths"][lo]}
    spec = losses.spec(loss_type)
    kwargs = {k: v for k, v in arrays.items() if k in spec.required}
    return np.asarray(spec.fn(**kwargs, **_hyper(spec.name, loss_type, f_div)), np.float64)


@pytest.mark.parametrize("f_div", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_losses_and_rewards_equal_trl(loss_type, f_div):
    """Every loss type under every f-divergence. TRL's __init__ refuses a non-reverse-KL f-divergence for the
    raw-log-ratio losses, but its loss block still runs them: their branches ignore the transform, and
    alignjax's versions (which take no f-divergence) equal them."""
    data = _batch(seed=len(loss_type) * 7 + F_DIVERGENCES.index(f_div))
    ours = _ours(data, loss_type, f_div)
    mean, _ = _trl(data, np.arange(B), loss_type, f_div)
    np.testing.assert_allclose(ours.mean(), mean, rtol=1e-5, atol=1e-6)
    if loss_type in BATCH_COUPLED:
        return
    per_example, rewards = zip(*(_trl(data, [i], loss_type, f_div) for i in range(B)), strict=True)
    np.testing.assert_allclose(ours, per_example, rtol=1e-5, atol=1e-6)
    # TRL's reward metrics are beta * raw log-ratio, whatever the f-divergence: so are alignjax's.
    ours_metrics = losses.preference_metrics(data["logps"][:B], data["logps"][B:], data["ref"][:B],
                                             data["ref"][B:], beta=BETA)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        np.testing.assert_allclose(float(ours_metrics[key]), np.mean([m[key] for m in rewards]), rtol=1e-5,
                                   atol=1e-6)


def test_f_divergence_only_where_trl_applies_it():
    """The raw-log-ratio losses take no f-divergence (TRL refuses it for them), so a config asking for one
    fails on the unknown key instead of silently training something TRL does not define."""
    for loss_type in TRL_LOSS_TYPES:
        has = "f_divergence" in losses.spec(loss_type).hyperparameters
        assert has == (loss_type in TRL_F_DIVERGENCE_TYPES), loss_type


def test_trl_sigmoid_ignores_label_smoothing_and_cdpo_is_eps_zero():
    """TRL 1.16's ``sigmoid`` ignores label_smoothing; alignjax's ``sigmoid`` keeps cDPO's meaning
    (TRL <= 0.28, and MCTS-DPO's smoothing), and equals TRL 1.16 at label_smoothing = 0."""
    data = _batch(seed=3)
    # TRL runs with label_smoothing = EPS
    trl_loss = np.array([_trl(data, [i], "sigmoid", "reverse_kl")[0] for i in range(B)])
    np.testing.assert_allclose(_ours(data, "sigmoid", "reverse_kl"), trl_loss, rtol=1e-5)
    w, lo = slice(0, B), slice(B, 2 * B)
    smoothed = losses.get("sigmoid")(data["logps"][w], data["logps"][lo], data["ref"][w], data["ref"][lo],
                                     beta=BETA, label_smoothing=EPS)
    assert np.abs(np.asarray(smoothed) - trl_loss).max() > 1e-2


def test_gpo_square_with_hard_win_probabilities_is_trl_sppo_hard():
    """P(y_w > pi) = 1, P(y_l > pi) = 0 is the hard case TRL's ``sppo_hard`` implements."""
    data = _batch(seed=5)
    w, lo = slice(0, B), slice(B, 2 * B)
    got = losses.get("gpo_square")(data["logps"][w], data["logps"][lo], data["ref"][w], data["ref"][lo],
                                   np.ones(B, np.float32), np.zeros(B, np.float32), beta=BETA)
    want = [_trl(data, [i], "sppo_hard", "reverse_kl")[0] for i in range(B)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
