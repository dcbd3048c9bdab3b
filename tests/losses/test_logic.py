"""The logic compiler: weighted model counting against brute force, and the DPO / CPO / ORPO / SimPO /
bco_pair formulas against the registered losses (values, gradients, jit)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alignjax.losses as losses
from alignjax.losses import logic as L
from alignjax.losses import registry

B = 12


@pytest.fixture(autouse=True)
def clean_registry():
    """Compiled losses registered by a test are removed afterwards (the docs test renders the registry)."""
    saved, saved_alias = dict(registry._REGISTRY), dict(registry._ALIASES)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
    registry._ALIASES.clear()
    registry._ALIASES.update(saved_alias)


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    a = {k: rng.normal(-15.0, 6.0, B).astype(np.float32)
         for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}
    a["chosen_lengths"] = rng.integers(1, 12, B).astype(np.int32)
    a["rejected_lengths"] = rng.integers(1, 12, B).astype(np.int32)
    a["rejected_lengths"][0] = 0  # an empty completion counts as one token in both implementations
    return {k: jnp.asarray(v) for k, v in a.items()}


def pick(arrays, fn):
    return {k: arrays[k] for k in losses.spec(fn).required} if isinstance(fn, str) else \
        {k: arrays[k] for k in fn}


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def check_equal(compiled_name, library_name, arrays, **hyper):
    """Values, jit values and gradients of the compiled loss equal the library loss."""
    lib_inputs = pick(arrays, library_name)
    ours_inputs = pick(arrays, compiled_name)
    assert set(ours_inputs) == set(lib_inputs), (compiled_name, library_name)
    ours, lib = losses.get(compiled_name), losses.get(library_name)
    close(ours(**ours_inputs, **hyper), lib(**lib_inputs, **hyper))
    close(jax.jit(lambda x: ours(**x, **hyper))(ours_inputs), lib(**lib_inputs, **hyper))
    floats = [k for k in lib_inputs if "lengths" not in k]

    def total(fn, x):
        return lambda f: jnp.sum(fn(**{**x, **f}, **hyper))

    g_ours = jax.grad(total(ours, ours_inputs))({k: ours_inputs[k] for k in floats})
    g_lib = jax.grad(total(lib, lib_inputs))({k: lib_inputs[k] for k in floats})
    for k in floats:
        close(g_ours[k], g_lib[k])


# ----------------------------------------------------------------------------- weighted model counting


def brute_force_probability(formula, given, probs):
    """P(formula | given) by summing products over all assignments (float64, no logs)."""
    names = list(probs)
    num = den = 0.0
    for bits in itertools.product([False, True], repeat=len(names)):
        a = dict(zip(names, bits))
        w = np.prod([probs[n] if a[n] else 1.0 - probs[n] for n in names])
        if given.evaluate(a):
            den += w
            if formula.evaluate(a):
                num += w
    return num / den


def test_log_probability_matches_brute_force():
    rng = np.random.default_rng(1)
    logits = {n: rng.normal(0, 2, B).astype(np.float32) for n in "abc"}
    atoms = {n: L.Atom(n, (n,), (), lambda v, h, n=n: (jax.nn.log_sigmoid(v[n]), jax.nn.log_sigmoid(-v[n])))
             for n in "abc"}
    a, b, c = atoms.values()
    cases = [(a & ~b, L.exactly_one(a, b)), (a >> b, L.TRUE), ((a | c) & ~b, a | b), (a ^ b ^ c, ~c | a),
             (L.exactly_one(a, b, c), L.TRUE), (a & ~b & c, (a & ~b & c) | (~a & b))]
    values = {n: jnp.asarray(v) for n, v in logits.items()}
    for formula, given in cases:
        got = np.exp(np.asarray(L.log_probability(L.Preference(formula, given), values, {}), np.float64))
        for i in range(B):
            p = {n: 1.0 / (1.0 + np.exp(-float(logits[n][i]))) for n in "abc"}
            np.testing.assert_allclose(got[i], brute_force_probability(formula, given, p), rtol=2e-5,
                                       err_msg=f"{formula} | {given}")


def test_one_true_is_sigmoid_of_logit_difference(arrays):
    """P(M_w & ~M_l | exactly one) = s(logit p_w - logit p_l), the identity the DPO family rests on."""
    beta = 0.3
    lp = L.log_probability(L.dpo_formula(), dict(arrays), {"beta": beta})
    z = beta * ((arrays["chosen_logps"] - arrays["ref_chosen_logps"])
                - (arrays["rejected_logps"] - arrays["ref_rejected_logps"]))
    close(lp, -np.logaddexp(0.0, -np.asarray(z, np.float64)))


# ----------------------------------------------------------------------------- the library's losses


def test_dpo(arrays):
    L.compile_loss(L.dpo_formula(), name="logic_dpo")
    assert losses.spec("logic_dpo").required == losses.spec("dpo").required
    assert losses.spec("logic_dpo").family == "logic"
    for beta in (0.1, 0.5, 2.0):
        check_equal("logic_dpo", "dpo", arrays, beta=beta)


def test_length_normalised_dpo(arrays):
    L.compile_loss(L.one_true_preference("mean_ratio"), name="logic_ln_dpo")
    check_equal("logic_ln_dpo", "sigmoid_norm", arrays, beta=0.7)


def test_bco_pair_is_the_unconditioned_formula(arrays):
    L.compile_loss(L.bco_pair_formula(), name="logic_bco_pair")
    check_equal("logic_bco_pair", "bco_pair", arrays, beta=0.2)


def test_cpo_full_and_preference_term(arrays):
    """Full CPO (preference + nll_weight * NLL) and, with nll_weight = 0, its preference term alone."""
    L.compile_loss(L.cpo_formula(), name="logic_cpo")
    assert losses.spec("logic_cpo").required == losses.spec("cpo").required
    check_equal("logic_cpo", "cpo", arrays, beta=0.2, nll_weight=0.5)
    check_equal("logic_cpo", "cpo", arrays, beta=0.1, nll_weight=0.0)


def test_orpo_full_and_odds_ratio_term(arrays):
    """Full ORPO (NLL + beta * odds-ratio term) equals the library; the odds-ratio term alone equals
    orpo minus its NLL (-S_w / n_w)."""
    L.compile_loss(L.orpo_formula(), name="logic_orpo")
    check_equal("logic_orpo", "orpo", arrays, beta=0.2)
    odds = L.compile_loss(L.one_true_preference("mean_prob"), name="logic_orpo_odds", register_as=None)
    x = pick(arrays, "orpo")
    nll = -x["chosen_logps"] / jnp.maximum(x["chosen_lengths"], 1)
    close(0.3 * odds(**x), losses.get("orpo")(**x, beta=0.3) - nll)
    assert "logic_orpo_odds" not in losses.names()


def test_simpo_with_margin_coin(arrays):
    """SimPO's gamma needs a third proposition (a coin with P = exp(-gamma)); gamma = 0 is the two-atom
    formula."""
    L.compile_loss(L.simpo_formula(), name="logic_simpo")
    for gamma in (0.0, 0.5, 1.5):
        check_equal("logic_simpo", "simpo", arrays, beta=2.0, gamma=gamma)
    plain = L.compile_loss(L.one_true_preference("mean_logp"), name="x", register_as=None)
    x = pick(arrays, "simpo")
    close(plain(**x, beta=2.5), losses.get("simpo")(**x, beta=2.5, gamma=0.0))


# ----------------------------------------------------------------------------- new formulas, errors


def test_new_formula_is_a_registered_trainer_loss(arrays):
    """-log P(M_l -> M_w) (no condition): "the rejected answer holds only if the chosen one does"."""
    mw, ml = L.M("w"), L.M("l")
    fn = L.compile_loss(L.Preference(ml >> mw), name="logic_implication", defaults={"beta": 0.5})
    spec = losses.spec("logic_implication")
    assert spec.required == ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    assert spec.hyperparameters == {"beta": 0.5} and spec.needs_reference
    x = {k: np.asarray(v, np.float64) for k, v in pick(arrays, spec.required).items()}
    sig = lambda t: 1.0 / (1.0 + np.exp(-t))  # noqa: E731
    pw = sig(0.5 * (x["chosen_logps"] - x["ref_chosen_logps"]))
    pl = sig(0.5 * (x["rejected_logps"] - x["ref_rejected_logps"]))
    close(fn(**pick(arrays, spec.required)), -np.log(1.0 - pl * (1.0 - pw)))
    assert "-log P((M_ratio(x, y_l) -> M_ratio(x, y_w)))" in losses.get("logic_implication").__doc__


def test_errors():
    mw = L.M("w")
    with pytest.raises(ValueError, match="unsatisfiable"):
        L.compile_loss(L.Preference(mw & ~mw), name="bad", register_as=None)
    with pytest.raises(ValueError, match=r"need a default"):
        L.compile_loss(L.Term(L.dpo_formula(), weight="lam"), name="bad", register_as=None)
    with pytest.raises(ValueError, match="side must be one of"):
        L.M("winner")
    with pytest.raises(ValueError, match="score must be one of"):
        L.M("w", "odds")
    with pytest.raises(TypeError, match="logic Formula"):
        mw & 3
    L.compile_loss(L.dpo_formula(), name="logic_dup")
    L.compile_loss(L.dpo_formula(), name="logic_dup")  # the same definition again: a no-op
    with pytest.raises(ValueError, match="registered twice"):  # another formula under the name
        L.compile_loss(L.Preference(L.M("w") | L.M("l")), name="logic_dup")
