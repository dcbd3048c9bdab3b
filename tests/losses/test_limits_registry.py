"""Known limits between losses, the registry contract, the generated docs, and the metrics helper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_expit as ls

from alignjax import losses
from alignjax.losses import common, docs, listwise, modifiers, pairwise, reference_free, step_level

B = 6
TRL_NAMES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)


@pytest.fixture(scope="module")
def pair():
    r = np.random.default_rng(0)
    sw, sl = -r.uniform(5, 30, B), -r.uniform(5, 30, B)
    return {
        "chosen_logps": jnp.asarray(sw, jnp.float32),
        "rejected_logps": jnp.asarray(sl, jnp.float32),
        "ref_chosen_logps": jnp.asarray(sw + r.normal(0, 2, B), jnp.float32),
        "ref_rejected_logps": jnp.asarray(sl + r.normal(0, 2, B), jnp.float32),
    }


def close(x, y, tol=1e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("f_div", common.F_DIVERGENCES)
def test_equal_logps_give_log2(pair, f_div):
    same = {**pair, "ref_chosen_logps": pair["chosen_logps"], "ref_rejected_logps": pair["rejected_logps"]}
    close(pairwise.dpo(**same, f_divergence=f_div), np.full(B, np.log(2.0)))


def test_cdpo_eps0_and_unit_limits(pair):
    beta = 0.3
    d = pairwise.dpo(**pair, beta=beta)
    assert losses.get("cdpo") is losses.get("sigmoid") is pairwise.dpo
    close(pairwise.dpo(**pair, beta=beta, label_smoothing=0.0), d)
    close(pairwise.gamma_dpo(**pair, beta=beta, gamma=0.0), d)
    close(pairwise.dpo_split_beta(**pair, beta_chosen=beta, beta_rejected=beta), d)
    close(modifiers.rpo(**pair, chosen_lengths=jnp.ones(B), beta=beta, nll_weight=0.0), d)
    # ADPO: q = 1, anchor = reference, tau = 1 / beta
    close(pairwise.adpo(**pair, chosen_probs=jnp.ones(B), tau=1 / beta), d)
    close(pairwise.adpo(**pair, tau=1 / beta), d)


def test_adpo_listwise_k2_is_dpo(pair):
    beta = 0.2
    logps = jnp.stack([pair["chosen_logps"], pair["rejected_logps"]], -1)
    ref = jnp.stack([pair["ref_chosen_logps"], pair["ref_rejected_logps"]], -1)
    q = jnp.tile(jnp.asarray([[1.0, 0.0]]), (B, 1))
    close(listwise.adpo_listwise(logps, ref, q, tau=1 / beta), pairwise.dpo(**pair, beta=beta))
    # and the pairwise soft form equals the listwise one for any q
    qs = jnp.linspace(0.1, 0.9, B)
    close(
        listwise.adpo_listwise(logps, ref, jnp.stack([qs, 1 - qs], -1), tau=3.0)
        + (-(qs * jnp.log(qs) + (1 - qs) * jnp.log(1 - qs))),  # CE = KL + H(q)
        pairwise.adpo(**pair, chosen_probs=qs, tau=3.0),
    )


def test_adpo_listwise_masked_equals_sliced():
    r = np.random.default_rng(1)
    s, a = jnp.asarray(-r.uniform(1, 9, (B, 5))), jnp.asarray(-r.uniform(1, 9, (B, 5)))
    q = jnp.asarray(r.dirichlet(np.ones(3), B))
    mask = jnp.asarray(np.r_[np.ones(3), np.zeros(2)])[None].repeat(B, 0)
    q_pad = jnp.concatenate([q, jnp.full((B, 2), 0.3)], -1)  # q on masked candidates is ignored
    close(
        listwise.adpo_listwise(s, a, q_pad, mask, tau=2.0),
        listwise.adpo_listwise(s[:, :3], a[:, :3], q, tau=2.0),
    )


def test_dove_with_equal_instructions_is_dpo(pair):
    i = jnp.asarray(np.random.default_rng(2).uniform(-20, -1, B), jnp.float32)
    ri = i - 1.5
    out = modifiers.dove(
        **pair,
        chosen_instruction_logps=i,
        rejected_instruction_logps=i,
        ref_chosen_instruction_logps=ri,
        ref_rejected_instruction_logps=ri,
    )
    close(out, pairwise.dpo(**pair), 1e-4)
    # the helper form: dpo(**joint(...)) is the same function of the joint log-probs
    j = modifiers.joint(
        pair["chosen_logps"],
        pair["rejected_logps"],
        i,
        i + 3.0,
        pair["ref_chosen_logps"],
        pair["ref_rejected_logps"],
        ri,
        ri,
    )
    close(
        pairwise.dpo(**j),
        modifiers.dove(
            **pair,
            chosen_instruction_logps=i,
            rejected_instruction_logps=i + 3.0,
            ref_chosen_instruction_logps=ri,
            ref_rejected_instruction_logps=ri,
        ),
    )


@pytest.mark.parametrize("fusion", ["mean", "max_margin"])
def test_infifpo_one_source_is_length_normalised_dpo(pair, fusion):
    lw, ll = jnp.asarray([3, 5, 1, 7, 2, 4]), jnp.asarray([2, 6, 4, 1, 3, 5])
    src_w = (pair["ref_chosen_logps"] / lw)[:, None]
    src_l = (pair["ref_rejected_logps"] / ll)[:, None]
    out = pairwise.infifpo(
        pair["chosen_logps"],
        pair["rejected_logps"],
        lw,
        ll,
        src_w,
        src_l,
        beta=0.5,
        fusion=fusion,
        clip=False,
    )
    want = pairwise.dpo(
        pair["chosen_logps"] / lw, pair["rejected_logps"] / ll, src_w[:, 0], src_l[:, 0], beta=0.5
    )
    close(out, want)


def test_infifpo_clip_and_fusion_raise(pair):
    with pytest.raises(ValueError, match="fusion must be 'mean' or 'max_margin'"):
        pairwise.infifpo(
            pair["chosen_logps"],
            pair["rejected_logps"],
            jnp.ones(B),
            jnp.ones(B),
            jnp.zeros((B, 2)),
            jnp.zeros((B, 2)),
            fusion="sum",
        )


def test_mcts_dpo_limits(pair):
    zeros = jnp.zeros(B, jnp.int32)
    visits = jnp.asarray([0, 1, 3, 10, 2, 7])
    close(step_level.mcts_dpo(**pair, chosen_visits=visits, rejected_visits=zeros), pairwise.dpo(**pair))
    close(
        step_level.visit_label_smoothing(jnp.asarray([0, 0, 4, 1]), jnp.asarray([0, 5, 4, 100])),
        [0.0, 0.5, 0.5, 0.5],
    )
    close(step_level.visit_label_smoothing(jnp.asarray([3]), jnp.asarray([1])), [0.25])


def test_gpo_square_hard_is_sppo_hard(pair):
    hard = {"chosen_win_probs": jnp.ones(B), "rejected_win_probs": jnp.zeros(B)}
    close(pairwise.gpo_square(**pair, **hard), pairwise.sppo_hard(**pair))
    # Win probabilities from GPM scores against K samples: scores far above 0 win surely, far below lose.
    scores = jnp.asarray([[100.0, 100.0, -100.0, -100.0]] * B)
    close(pairwise.gpm_win_probability(scores), np.full(B, 0.5))
    close(pairwise.gpm_win_probability(scores, mask=jnp.asarray([[1, 1, 1, 0]] * B)), np.full(B, 2 / 3))


def test_alphapo_alpha0_is_simpo(pair):
    n = {"chosen_lengths": jnp.arange(1, B + 1), "rejected_lengths": jnp.arange(B, 0, -1)}
    args = {"chosen_logps": pair["chosen_logps"], "rejected_logps": pair["rejected_logps"], **n}
    close(reference_free.alphapo(**args, alpha=0.0), reference_free.simpo(**args))
    close(reference_free.alphapo(**args, alpha=1e-5), reference_free.simpo(**args), 1e-3)


def test_ld_dpo_limits():
    r = np.random.default_rng(3)
    m = jnp.asarray((np.arange(5)[None] < r.integers(1, 6, (B, 1))).astype(np.float32))
    m2 = jnp.asarray((np.arange(5)[None] < r.integers(1, 6, (B, 1))).astype(np.float32))
    tok = {
        k: jnp.asarray(-r.uniform(0.1, 3, (B, 5)), jnp.float32) * mk
        for k, mk in (
            ("chosen_token_logps", m),
            ("rejected_token_logps", m2),
            ("ref_chosen_token_logps", m),
            ("ref_rejected_token_logps", m2),
        )
    }
    summed = {k.replace("_token", ""): v.sum(-1) for k, v in tok.items()}
    close(modifiers.ld_dpo(**tok, chosen_mask=m, rejected_mask=m2, ld_alpha=1.0), pairwise.dpo(**summed))
    # equal lengths: nothing is "excess", any alpha gives DPO
    close(
        modifiers.ld_dpo(
            **{
                **tok,
                "rejected_token_logps": tok["rejected_token_logps"] * 0 + tok["chosen_token_logps"] * 0.5,
                "ref_rejected_token_logps": tok["ref_chosen_token_logps"],
            },
            chosen_mask=m,
            rejected_mask=m,
            ld_alpha=0.2,
        ),
        pairwise.dpo(
            summed["chosen_logps"],
            summed["chosen_logps"] * 0.5,
            summed["ref_chosen_logps"],
            summed["ref_chosen_logps"],
        ),
    )


def test_ranking_identity(pair):
    """Exact identity of the ranking-accuracy paper: pi(y_w) >= pi(y_l) iff L_DPO <= -ls(beta (R_l - R_w))."""
    beta = 0.1
    loss = np.asarray(pairwise.dpo(**pair, beta=beta), np.float64)
    c = np.asarray(pair["ref_rejected_logps"] - pair["ref_chosen_logps"], np.float64)
    ranked = np.asarray(pair["chosen_logps"] >= pair["rejected_logps"])
    assert ranked.any() and not ranked.all()
    np.testing.assert_array_equal(loss <= -ls(beta * c) + 1e-7, ranked)


def test_ranking_margin_makes_low_loss_imply_correct_ranking():
    """From the identity above (not from gamma_dpo's formula): pi(y_w) >= pi(y_l) iff
    z = beta (u_w - u_l) >= beta (R_l - R_w). The bound is positive exactly where the reference ranks y_l
    higher, so the margin must grow there: with gamma = 0, a loss <= log 2 then holds iff the policy ranks
    y_w first where R_l > R_w, and implies it everywhere."""
    r = np.random.default_rng(11)
    n, beta = 400, 0.5
    sw, sl = -r.uniform(5, 30, n), -r.uniform(5, 30, n)
    rw, rl = sw + r.normal(0, 6, n), sl + r.normal(0, 6, n)
    args = [jnp.asarray(x, jnp.float32) for x in (sw, sl, rw, rl)]
    loss = np.asarray(pairwise.gamma_dpo(*args, beta=beta, gamma=0.0, ranking_margin=True), np.float64)
    low = loss <= np.log(2.0)
    ranked = sw >= sl
    ref_prefers_rejected = rl > rw
    # The cases plain DPO gets wrong: loss below log 2 (z > 0) while the policy ranks y_l first.
    dpo_low = np.asarray(pairwise.dpo(*args, beta=beta), np.float64) <= np.log(2.0)
    assert (dpo_low & ~ranked).sum() >= 5
    assert not (low & ~ranked).any()
    np.testing.assert_array_equal(low[ref_prefers_rejected], ranked[ref_prefers_rejected])


# ----------------------------------------------------------------------------- registry and docs


def test_trl_names_resolve():
    for n in TRL_NAMES:
        spec = losses.spec(n)
        assert spec.needs_reference and spec.family == "pairwise", n
        assert {"chosen_logps", "rejected_logps"} <= set(spec.required)
    assert losses.canonical("hinge") == "slic" and losses.aliases("slic") == ("hinge",)
    assert set(losses.spec("ipo").required) >= {"chosen_lengths", "rejected_lengths"}
    assert not losses.spec("simpo").needs_reference and not losses.spec("orpo").needs_reference


def test_modifier_signatures_are_declarative():
    assert losses.spec("rpo").required[-1] == "chosen_lengths"
    assert losses.spec("rpo").hyperparameters["nll_weight"] == 1.0
    assert losses.spec("spar").hyperparameters["nll_weight"] == 0.1
    ld = losses.spec("ld_dpo")
    assert "chosen_logps" not in ld.required and "ref_chosen_token_logps" in ld.required
    ipo_nll = modifiers.with_nll(pairwise.ipo)
    spec = losses.registry._spec("ipo_nll", ipo_nll, "pairwise", False)
    assert spec.required.count("chosen_lengths") == 1
    with pytest.raises(ValueError, match="already exist in rpo"):
        modifiers.with_nll(modifiers.rpo)
    with pytest.raises(TypeError):
        modifiers.rpo(jnp.zeros(B), jnp.zeros(B), jnp.zeros(B), jnp.zeros(B))  # chosen_lengths missing


def test_composites_jit_with_keywords(pair):
    fn = jax.jit(lambda a: modifiers.rpo(**a, chosen_lengths=jnp.full(B, 4), nll_weight=0.5))
    close(fn(pair), pairwise.dpo(**pair) - 0.5 * pair["chosen_logps"] / 4)


def test_docs_are_up_to_date():
    assert docs.DOCS_PATH.read_text() == docs.render(), "run `python -m alignjax.losses.docs`"
    text = docs.render()
    for n in losses.names(include_aliases=False):
        assert f"### {n}\n" in text
    assert "`sigmoid`" in text and "arXiv 2305.18290" in text


# ----------------------------------------------------------------------------- metrics


def test_preference_metrics(pair):
    beta = 0.2
    m = jax.jit(lambda a: losses.preference_metrics(**a, beta=beta))(pair)
    p = {k: np.asarray(v, np.float64) for k, v in pair.items()}
    rw, rl = (
        beta * (p["chosen_logps"] - p["ref_chosen_logps"]),
        beta * (p["rejected_logps"] - p["ref_rejected_logps"]),
    )
    want = {
        "rewards/chosen": rw.mean(),
        "rewards/rejected": rl.mean(),
        "rewards/accuracies": (rw > rl).mean(),
        "rewards/margins": (rw - rl).mean(),
        "logps/chosen": p["chosen_logps"].mean(),
        "logps/rejected": p["rejected_logps"].mean(),
    }
    assert set(m) == set(want)
    for k in want:
        close(m[k], want[k])
    free = losses.preference_metrics(pair["chosen_logps"], pair["rejected_logps"], beta=beta)
    close(free["rewards/margins"], beta * (p["chosen_logps"] - p["rejected_logps"]).mean())
    close(free["rewards/accuracies"], (p["chosen_logps"] > p["rejected_logps"]).mean())
    with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps"):
        losses.preference_metrics(pair["chosen_logps"], pair["rejected_logps"], pair["ref_chosen_logps"])
