"""SparsePO with learned masks ("SparsePO: Controlling Preference Alignment of LLMs via Sparse Token
Masks", arXiv 2410.05102): each mask is sigmoid(w . h + b) of the reference's hidden state at the
position that predicts the token, with w, b trained as part of the policy.

The step's loss equals the registered ``sparsepo`` (checked against the official code in
tests/losses/test_official_ports.py) applied to token log-probs, token KLs and masks computed here
in NumPy from the two models' logits and hidden states; gradients reach the mask heads and only
them beyond the policy; a run trains them.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import alignjax.losses as losses
from alignjax.models import AUX_HEADS
from alignjax.train import step as steplib
from tests.train.conftest import host_batches, small_model

B = 4
HEADS = (("sparsepo_reward_mask", 1), ("sparsepo_kl_mask", 1))


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _shifted(values):
    """values[:, t] computed at position t for token t + 1 -> placed at t + 1 (0 at t = 0)."""
    out = np.zeros_like(values)
    out[:, 1:] = values[:, :-1]
    return out


def _spec(**hyper):
    config = ml_collections.ConfigDict(dict(loss=dict(name="sparsepo_learned", **hyper),
                                            data=dict(kind="pairwise"), train=dict(nan_at_step=-1)))
    return steplib.make_step_spec(config, B, "model")


def test_learned_masks_are_the_policy_heads_on_reference_states():
    model = small_model()
    model = type(model)(model.config.replace(aux_heads=HEADS))
    spec = _spec(beta=0.3, l1_reward=0.01, l1_kl=0.02)
    assert steplib.aux_heads(spec.required, dict(spec.provider_hyperparameters)) == HEADS
    params, ref_params = model.init(jax.random.PRNGKey(1)), model.init(jax.random.PRNGKey(2))
    host = host_batches(B, 1)[0]
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    got, _ = jax.jit(steplib.make_loss_fn(model, spec))(params, ref_params, None, batch)

    ids, mask = host["input_ids"], host["loss_mask"].astype(np.float64)
    lp = _log_softmax(model.apply(params, batch["input_ids"]))
    lq = _log_softmax(model.apply(ref_params, batch["input_ids"]))
    take = lambda logp: _shifted(np.take_along_axis(logp, np.roll(ids, -1, 1)[..., None], -1)[..., 0]) * mask  # noqa: E731
    kl = _shifted((np.exp(lq) * (lp - lq)).sum(-1)) * mask
    h_ref = np.asarray(model.hidden(ref_params, batch["input_ids"]), np.float64)
    head = {k: np.asarray(v, np.float64) for k, v in params[AUX_HEADS].items()}

    def learned(name):
        z = h_ref @ head[f"{name}_kernel"][:, 0] + head[f"{name}_bias"][0]
        return _shifted(1.0 / (1.0 + np.exp(-z))) * mask

    m_u, m_d = learned("sparsepo_reward_mask"), learned("sparsepo_kl_mask")
    pol, ref = take(lp), take(lq)
    halves = lambda a: (jnp.asarray(a[:B]), jnp.asarray(a[B:]))  # noqa: E731
    want = losses.get("sparsepo")(*halves(pol), *halves(ref), *halves(kl), *halves(mask), *halves(m_u),
                                  *halves(m_d), beta=0.3, l1_reward=0.01, l1_kl=0.02)
    np.testing.assert_allclose(float(got), float(np.mean(want)), rtol=2e-5)

    # The masks' heads train with the policy; the shared ("common") mask leaves the KL head unused.
    grads = jax.grad(lambda p: steplib.make_loss_fn(model, spec)(p, ref_params, None, batch)[0])(params)
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads[AUX_HEADS]))
    shared = _spec(shared_mask=True)
    grads = jax.grad(lambda p: steplib.make_loss_fn(model, shared)(p, ref_params, None, batch)[0])(params)
    assert np.abs(np.asarray(grads[AUX_HEADS]["sparsepo_kl_mask_kernel"])).sum() == 0
    assert np.abs(np.asarray(grads[AUX_HEADS]["sparsepo_reward_mask_kernel"])).sum() > 0
