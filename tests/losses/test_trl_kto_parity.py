"""KTO and unpaired APO-zero equal TRL 1.16's ``KTOTrainer._compute_loss``, executed.

TRL's method runs on a stand-in trainer whose model returns per-token log-probs summing to the
given sequence log-probs (and whose KL forward returns the mismatched pairs' log-probs); the
reference log-probs arrive precomputed, as TRL's ``precompute_ref_log_probs`` gives them.
"""

import types
from collections import defaultdict

import jax.numpy as jnp
import numpy as np
import pytest

import alignjax.losses as losses

torch = pytest.importorskip("torch")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")

B, T = 8, 6


def _trl_loss(loss_type, logps, ref_logps, labels, kl_logps, ref_kl_logps, beta, wd, wu):
    per_token = np.zeros((B, T - 1), np.float32)
    per_token[:, 0] = logps  # rows sum to the sequence log-probs

    class Model:
        training = True

        def __call__(self, **_):
            z = torch.zeros(B, T - 1)
            return types.SimpleNamespace(log_probs=torch.tensor(per_token), entropy=z, mean_logits=z)

    model = Model()
    acc = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(
        model=model, accelerator=acc, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=loss_type == "kto", loss_type=loss_type, beta=beta, desirable_weight=wd,
        undesirable_weight=wu, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
        _tp_size=1, _compute_kl_logps=lambda m, batch: torch.tensor(kl_logps))
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T),
             "completion_mask": torch.ones(B, T, dtype=torch.long), "label": torch.tensor(labels),
             "ref_logps": torch.tensor(ref_logps), "ref_KL_logps": torch.tensor(ref_kl_logps)}
    with torch.no_grad():
        loss = trl_kto.KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    return float(loss), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("seed,weights", [(0, (1.0, 1.0)), (1, (1.33, 0.8)), (2, (1.0, 1.0))])
def test_unpaired_losses_equal_trl(loss_type, seed, weights):
    rng = np.random.default_rng(seed)
    logps, ref_logps = (rng.normal(-20, 4, B).astype(np.float32) for _ in range(2))
    kl_logps = rng.normal(-20, 4, B).astype(np.float32)
    # seed 2: a mismatched-pair KL below zero, which KTO clamps to 0
    ref_kl_logps = (kl_logps + (3.0 if seed == 2 else -rng.uniform(0, 4, B))).astype(np.float32)
    labels = np.array([True, False] * (B // 2))
    rng.shuffle(labels)
    beta, (wd, wu) = 0.3, weights
    want, metrics = _trl_loss(loss_type, logps, ref_logps, labels, kl_logps, ref_kl_logps, beta, wd, wu)
    args = dict(logps=logps, ref_logps=ref_logps, labels=labels)
    hyper = dict(beta=beta, desirable_weight=wd, undesirable_weight=wu)
    if loss_type == "kto":
        args.update(kl_logps=kl_logps, ref_kl_logps=ref_kl_logps)
    got = losses.get(loss_type)(**{k: jnp.asarray(v) for k, v in args.items()}, **hyper)
    np.testing.assert_allclose(float(jnp.mean(got)), want, rtol=1e-6, atol=1e-7)
    if loss_type == "kto":
        z0 = max(0.0, float(np.mean(kl_logps - ref_kl_logps)))
        assert metrics["kl"][-1] == pytest.approx(z0, rel=1e-6, abs=1e-7)
