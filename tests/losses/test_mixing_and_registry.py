"""Loss mixing against TRL 1.16's DPOTrainer (MPO = sigmoid + bco_pair + sft), WPO's weights from the
step's provider against the official code's computation, and user losses registered outside the
package (idempotent re-registration, ``config.loss.module``, ``--config.`` overrides)."""

from __future__ import annotations

import sys
import textwrap
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from alignjax import losses
from alignjax.losses import registry
from alignjax.train import step as steplib

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
B, T, BETA = 6, 7, 0.2


def _config(name, kind="pairwise", **keys):
    return ml_collections.ConfigDict(dict(loss=dict(name=name, **keys), data=dict(kind=kind, layout="padded"),
                                          train=dict(nan_at_step=-1)))


def _batch(seed):
    r = np.random.default_rng(seed)
    lengths = r.integers(1, T, 2 * B)
    completion = (np.arange(T)[None] >= T - lengths[:, None]).astype(np.int64)
    token = (-r.uniform(0.05, 1.5, (2 * B, T - 1)) * completion[:, 1:]).astype(np.float32)
    logps = token.sum(1)
    ref = (logps + r.normal(0.0, 1.5, 2 * B)).astype(np.float32)
    return token, completion, logps, ref, completion.sum(1)


def _trl_mix(token, completion, ref, loss_types, weights):
    class Model(torch.nn.Module):
        def forward(self, **_):
            lp = torch.tensor(token)
            z = torch.zeros_like(lp)
            return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())

    comp = torch.tensor(completion)
    trainer = types.SimpleNamespace(
        model=Model(), accelerator=types.SimpleNamespace(device="cpu", gather=lambda x: x,
                                                         gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, ref_model=None,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, loss_types=list(loss_types),
        loss_weights=list(weights), beta=BETA, label_smoothing=0.0, use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=0.05), _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(comp), "attention_mask": torch.ones_like(comp),
              "completion_mask": comp, "ref_chosen_logps": torch.tensor(ref[:B]),
              "ref_rejected_logps": torch.tensor(ref[B:])}
    with torch.no_grad():
        return float(trl_dpo.DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False))


@pytest.mark.parametrize("types_weights", [(("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)),
                                           (("ipo", "sft"), (1.0, 0.5)), (("hinge",), (2.0,))])
def test_mix_equals_trl_loss_type_list_with_loss_weights(types_weights):
    loss_types, weights = types_weights
    token, completion, logps, ref, lengths = _batch(0)
    sft = {"reduction": "tokens"} if "sft" in loss_types else {}  # TRL's sft: a batch token mean
    config = _config("+".join(loss_types), weights=weights, beta=BETA, **sft)
    spec = steplib.make_step_spec(config, B, "model")
    inputs = {"chosen_logps": logps[:B], "rejected_logps": logps[B:], "ref_chosen_logps": ref[:B],
              "ref_rejected_logps": ref[B:], "chosen_lengths": lengths[:B], "rejected_lengths": lengths[B:]}
    loss, metrics, _ = steplib.combine_losses(spec, {k: jnp.asarray(v) for k, v in inputs.items()})
    want = _trl_mix(token, completion, ref, loss_types, weights)
    np.testing.assert_allclose(float(loss), want, rtol=2e-6)
    if len(loss_types) > 1:
        assert set(metrics) == {"loss/objective", *(f"loss/{losses.canonical(t)}" for t in loss_types)}


@pytest.mark.parametrize("loss", ["rpo", "spar"])
def test_nll_losses_with_token_reduction_equal_trls_sigmoid_plus_weighted_sft(loss):
    """TRL 1.16 writes RPO as loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha]: our rpo/spar
    with nll_reduction="tokens" and nll_weight=alpha are that objective."""
    token, completion, logps, ref, lengths = _batch(2)
    config = _config(loss, beta=BETA, nll_weight=0.7, nll_reduction="tokens")
    spec = steplib.make_step_spec(config, B, "model")
    inputs = {"chosen_logps": logps[:B], "rejected_logps": logps[B:], "ref_chosen_logps": ref[:B],
              "ref_rejected_logps": ref[B:], "chosen_lengths": lengths[:B]}
    loss_value, _, _ = steplib.combine_losses(spec, {k: jnp.asarray(v) for k, v in inputs.items()})
    want = _trl_mix(token, completion, ref, ("sigmoid", "sft"), (1.0, 0.7))
    np.testing.assert_allclose(float(loss_value), want, rtol=2e-6)
    assert not np.allclose(lengths[:B], lengths[:B].mean())  # the two reductions differ on this batch


def test_sft_reductions_and_the_nll_weight_is_the_losses_own():
    token, completion, logps, ref, lengths = _batch(1)
    per_seq = losses.get("sft")(jnp.asarray(logps[:B]), jnp.asarray(lengths[:B]))
    per_tok = losses.get("sft")(jnp.asarray(logps[:B]), jnp.asarray(lengths[:B]), reduction="tokens")
    np.testing.assert_allclose(float(jnp.mean(per_seq)), np.mean(-logps[:B] / lengths[:B]), rtol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(per_tok)), -logps[:B].sum() / lengths[:B].sum(), rtol=1e-6)
    # cpo's own nll_weight is set from config.loss (no second NLL term); unset keeps its default.
    spec = steplib.make_step_spec(_config("cpo", nll_weight=0.25), B, "none")
    assert dict(spec.components[0][2])["nll_weight"] == 0.25 and spec.nll_weight == 0.0
    spec = steplib.make_step_spec(_config("cpo", nll_weight=None), B, "none")
    assert "nll_weight" not in dict(spec.components[0][2]) and spec.nll_weight == 0.0
    # a loss without one: the trainer's added term
    assert steplib.make_step_spec(_config("sigmoid", nll_weight=0.5), B, "model").nll_weight == 0.5


def _official_wpo_weights(logits, labels, mask):
    """The official WPO weight (wzhouad/WPO, ``get_batch_logps`` with the probability adjustment):
    per-token log p minus log sum_v p^2, averaged over the completion, exp'ed; pair weight clamped at 1."""
    logits = torch.tensor(np.asarray(logits))[:, :-1]
    labels = torch.tensor(np.asarray(labels))[:, 1:]
    mask = torch.tensor(np.asarray(mask))[:, 1:]
    logp = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        adjust = torch.log((probs ** 2).sum(-1))
        weights = ((logp - adjust) * mask).sum(-1) / mask.sum(-1)
    w, lo = weights.chunk(2)
    return torch.clamp(torch.exp(w + lo), max=1.0).numpy()


def test_wpo_weights_from_the_step_equal_the_official_code():
    from tests.train.conftest import host_batches, small_model

    model = small_model()
    params = model.init(jax.random.PRNGKey(3))
    host = host_batches(4, 1)[0]
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    spec = steplib.make_step_spec(_config("wpo"), 4, "model")
    out = steplib._forward(model, params, batch, 8, spec, {"logits"})
    inputs = steplib.loss_inputs(spec, batch, out, out)
    ours = np.exp(np.minimum(np.asarray(inputs["chosen_wpo_logps"] + inputs["rejected_wpo_logps"]), 0.0))
    want = _official_wpo_weights(out["logits"], host["input_ids"], host["loss_mask"])
    np.testing.assert_allclose(ours, want, rtol=2e-5)
    assert np.all(ours <= 1.0)


def test_refusals_name_the_loss_the_input_and_what_would_provide_it():
    def separate_kl_masks(chosen_logps, rejected_logps, chosen_kl_mask):
        return chosen_logps - rejected_logps

    losses.register("_separate_kl_masks", family="pairwise", replace=True)(separate_kl_masks)
    try:
        with pytest.raises(ValueError, match=r"config.loss.name='_separate_kl_masks'.*'chosen_kl_mask' "
                                             r"needs SparsePO's separate KL masks"):
            steplib.make_step_spec(_config("_separate_kl_masks"), B, "model")
    finally:
        registry._REGISTRY.pop("_separate_kl_masks", None)
    with pytest.raises(ValueError, match=r"'kto' needs input 'logps'.*kind='pairwise'.*\['unpaired'\]"):
        steplib.make_step_spec(_config("kto"), B, "model")
    with pytest.raises(ValueError, match=r"per-token input 'chosen_token_logps'.*layout='padded'"):
        steplib.check_loss_config(ml_collections.ConfigDict(
            dict(loss=dict(name="ld_dpo"), data=dict(kind="pairwise", layout="packed"))))
    with pytest.raises(ValueError, match=r"'bco' keeps its own state and cannot be mixed"):
        steplib.check_loss_config(_config("bco+kto", kind="unpaired"))
    with pytest.raises(ValueError, match=r"weights=\(1.0,\) has 1 entries for the 2 losses"):
        steplib.make_step_spec(_config("sigmoid+sft", weights=(1.0,)), B, "model")
    with pytest.raises(ValueError, match=r"config.loss.tau: loss 'sigmoid\+sft' has no hyperparameter"):
        steplib.make_step_spec(_config("sigmoid+sft", tau=1.0), B, "model")
    with pytest.raises(ValueError, match=r"rationales and SPO's degraded responses both take a pair's third"):
        steplib.check_loss_config(_config("spo+rationale_dpo"))
    assert "bradley_terry" in losses.names(trainable=False, include_aliases=False)  # its own job's
    assert set(losses.names(trainable=True)) >= {"wpo", "sparsepo", "sparsepo_learned", "rationale_dpo",
                                                 "dove", "spo"}


_USER = '''
import jax
import alignjax.losses as losses


@losses.register("user_margin_dpo", family="pairwise")
def user_margin_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
                    margin=1.0):
    """DPO with a fixed margin (a user's loss)."""
    z = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)) - margin
    return -jax.nn.log_sigmoid(z)
'''


def test_user_module_registers_once_and_replace_is_explicit(tmp_path):
    path = tmp_path / "my_losses.py"
    path.write_text(_USER)
    try:
        losses.load_module(str(path))
        losses.load_module(str(path))  # a second import is a no-op
        spec = losses.spec("user_margin_dpo")
        assert spec.trainable and spec.hyperparameters == {"beta": 0.1, "margin": 1.0}
        # The same definition executed again (a config file loaded twice) registers again quietly.
        exec(compile(_USER, str(path), "exec"), {"__name__": "another_name"})
        # A different function under the name needs replace=True.
        with pytest.raises(ValueError, match="'user_margin_dpo' is registered twice.*replace=True"):
            losses.register("user_margin_dpo", family="pairwise")(losses.get("sigmoid"))
        losses.register("user_margin_dpo", family="pairwise", replace=True)(losses.get("sigmoid"))
        assert losses.get("user_margin_dpo") is losses.get("sigmoid")
        with pytest.raises(ValueError, match=r"no provider is declared for its input\(s\) \['my_array'\]"):
            losses.register("bad_inputs", family="pairwise")(lambda chosen_logps, my_array: chosen_logps)
        with pytest.raises(FileNotFoundError, match="config.loss.module='nope.py': no such file"):
            losses.load_module("nope.py")
    finally:
        registry._REGISTRY.pop("user_margin_dpo", None)
        for name in [m for m in sys.modules if m.startswith("_alignjax_losses_")]:
            del sys.modules[name]


def test_a_loss_registered_in_the_experiment_file_survives_overrides(tmp_path, monkeypatch):
    from alignjax import main

    exp = tmp_path / "exp.py"
    exp.write_text(textwrap.dedent(_USER) + textwrap.dedent('''
        from experiments import dpo


        def get_config(arg=None):
            return dpo.get_config("runlocal,loss=user_margin_dpo")
    '''))
    argv = [f"--config={exp}", "--config.loss.margin=0.5"]
    try:
        main.check_overrides(argv)  # loads the file (registering the loss) ...
        config = main.load_config_file(str(exp))  # ... and again, as config_flags does
        config.loss.margin = 0.5
        main.validate(config)
        assert steplib.make_step_spec(config, 8, "model").hyperparameters == (("beta", 0.1), ("margin", 0.5))
    finally:
        registry._REGISTRY.pop("user_margin_dpo", None)
