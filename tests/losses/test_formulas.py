"""Every loss of the pairwise / reference-free / listwise / step-level / modifier families against an
independent NumPy (float64) implementation of its formula: eager, under jit, and gradients against
central finite differences of the NumPy formula. One jit per case (value) and one (gradient).

NumPy references take (a, a0): ``a`` the (possibly perturbed) inputs, ``a0`` the unperturbed inputs,
used for quantities the loss holds constant (stop-gradient), so finite differences see them fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit as sig
from scipy.special import log_expit as ls

from alignjax import losses
from alignjax.losses import modifiers

B, T, N, K = 5, 6, 3, 4


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    sw = -r.uniform(5, 30, B)
    sl = -r.uniform(5, 30, B)
    a = {
        "chosen_logps": sw,
        "rejected_logps": sl,
        "ref_chosen_logps": sw + r.normal(0, 1.5, B),
        "ref_rejected_logps": sl + r.normal(0, 1.5, B),
        "chosen_lengths": r.integers(1, 12, B).astype(np.int32),
        "rejected_lengths": r.integers(1, 12, B).astype(np.int32),
    }
    return a


def _n(x):
    return np.maximum(np.asarray(x, np.float64), 1.0)


def _g(u, kind="reverse_kl", alpha=0.5):
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - np.exp(-u)
    if kind == "js_divergence":
        return np.log(2) + ls(u)
    return (np.exp((alpha - 1) * u) - 1) / (alpha - 1)


def _cd(a, kind="reverse_kl", alpha=0.5):
    return (
        _g(a["chosen_logps"] - a["ref_chosen_logps"], kind, alpha),
        _g(a["rejected_logps"] - a["ref_rejected_logps"], kind, alpha),
    )


def np_dpo(a, a0, beta=0.1, eps=0.0, kind="reverse_kl", alpha=0.5):
    c, d = _cd(a, kind, alpha)
    z = beta * (c - d)
    return -(1 - eps) * ls(z) - eps * ls(-z)


def np_ipo(a, a0, beta=0.1, kind="reverse_kl"):
    c, d = _cd(a, kind)
    return (c / _n(a["chosen_lengths"]) - d / _n(a["rejected_lengths"]) - 1 / (2 * beta)) ** 2


def np_exo(a, a0, beta=0.1, eps=0.1):
    c, d = _cd(a)
    z = beta * (c - d)
    return sig(z) * (ls(z) - np.log(1 - eps)) + sig(-z) * (ls(-z) - np.log(eps))


def np_robust(a, a0, beta=0.1, eps=0.1):
    c, d = _cd(a)
    z = beta * (c - d)
    return (-(1 - eps) * ls(z) + eps * ls(-z)) / (1 - 2 * eps)


def np_aot(a, a0, beta=0.1, eps=0.1, paired=True):
    if paired:
        delta = np.sort(a["chosen_logps"] - a["rejected_logps"]) - np.sort(
            a["ref_chosen_logps"] - a["ref_rejected_logps"]
        )
    else:
        c, d = _cd(a)
        delta = np.sort(c) - np.sort(d)
    return -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)


def np_discopop(a, a0, beta=0.1, tau=0.05):
    c, d = _cd(a)
    z = beta * (c - d)
    m = sig(z / tau)
    return (1 - m) * -ls(z) + m * np.exp(-z)


def np_gamma(a, a0, beta=0.1, gamma=0.5, ranking=False):
    c, d = _cd(a)
    margin = gamma + (
        beta * np.maximum(0, a0["ref_rejected_logps"] - a0["ref_chosen_logps"]) if ranking else 0
    )
    return -ls(beta * (c - d) - margin)


def np_adpo(a, a0, tau=10.0, soft=True):
    c, d = _cd(a)
    x = (c - d) / tau
    q = a["chosen_probs"] if soft else 1.0
    return -(q * ls(x) + (1 - q) * ls(-x))


def np_infifpo(a, a0, beta=0.1, fusion="mean", clip=True):
    lw = a["chosen_logps"] / _n(a["chosen_lengths"])
    ll = a["rejected_logps"] / _n(a["rejected_lengths"])
    pw = a0["chosen_logps"] / _n(a0["chosen_lengths"])  # the pivot is held constant (stop-gradient)
    pl = a0["rejected_logps"] / _n(a0["rejected_lengths"])
    qw, ql = a["source_chosen_logps"], a["source_rejected_logps"]
    if clip:
        qw, ql = np.maximum(qw, pw[:, None]), np.minimum(ql, pl[:, None])
    if fusion == "mean":
        fw, fl = qw.mean(-1), ql.mean(-1)
    else:
        div = np.abs(a0["source_chosen_logps"] - pw[:, None]) + np.abs(
            a0["source_rejected_logps"] - pl[:, None]
        )
        i = div.argmax(-1)
        fw, fl = qw[np.arange(B), i], ql[np.arange(B), i]
    return -ls(beta * (lw - fw) - beta * (ll - fl))


def np_gpo(a, a0, beta=0.1):
    c, d = _cd(a)
    pw, pl = a0["chosen_win_probs"], a0["rejected_win_probs"]
    return (c - (pw - 0.5) / beta) ** 2 + (d - (pl - 0.5) / beta) ** 2


def np_simpo(a, a0, beta=2.0, gamma=0.5):
    return -ls(
        beta * (a["chosen_logps"] / _n(a["chosen_lengths"]) - a["rejected_logps"] / _n(a["rejected_lengths"]))
        - gamma
    )


def np_orpo(a, a0, beta=0.1):
    lw = a["chosen_logps"] / _n(a["chosen_lengths"])
    ll = a["rejected_logps"] / _n(a["rejected_lengths"])
    odds = (lw - np.log1p(-np.exp(lw))) - (ll - np.log1p(-np.exp(ll)))
    return -lw - beta * ls(odds)


def np_alphapo(a, a0, beta=2.0, gamma=0.5, alpha=0.25):
    lw = a["chosen_logps"] / _n(a["chosen_lengths"])
    ll = a["rejected_logps"] / _n(a["rejected_lengths"])
    r = (lambda x: beta * x) if alpha == 0 else (lambda x: beta / alpha * (1 - np.exp(-alpha * x)))
    return -ls(r(lw) - r(ll) - gamma)


def np_mcts(a, a0, beta=0.1):
    eps = np.minimum(a["rejected_visits"] / (np.maximum(1, a["chosen_visits"]) + a["rejected_visits"]), 0.5)
    return np_dpo(a, a0, beta, 0.0) * (1 - eps) + eps * -ls(-beta * np.subtract(*_cd(a)))


def np_listwise(a, a0, tau=10.0):
    x = (a["logps"] - a["ref_logps"]) / tau
    m = a["candidate_mask"].astype(bool)
    x = np.where(m, x, -np.inf)
    logp = (
        x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)
    )
    q = np.where(m, a["target_probs"], 0)
    q = q / q.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - np.where(m, logp, 0)), 0)
    return terms.sum(-1)


def np_ld(tok, mask, other):
    shared = np.minimum(mask.sum(-1), other.sum(-1))[:, None]
    pos = np.cumsum(mask, -1)
    return (tok * mask * (pos <= shared)).sum(-1), (tok * mask * (pos > shared)).sum(-1)


def np_ld_dpo(a, a0, beta=0.1, alpha=0.5):
    cm, rm = a["chosen_mask"], a["rejected_mask"]

    def ld(tok, m, o):
        s, t = np_ld(tok, m, o)
        return s + alpha * t

    b = {
        "chosen_logps": ld(a["chosen_token_logps"], cm, rm),
        "rejected_logps": ld(a["rejected_token_logps"], rm, cm),
        "ref_chosen_logps": ld(a["ref_chosen_token_logps"], cm, rm),
        "ref_rejected_logps": ld(a["ref_rejected_token_logps"], rm, cm),
    }
    return np_dpo(b, b, beta)


# ----------------------------------------------------------------------------- extra inputs per case


def _extra(seed, kind):
    r = np.random.default_rng(100 + seed)
    if kind == "q":
        return {"chosen_probs": r.uniform(0, 1, B)}
    if kind == "sources":
        return {
            "source_chosen_logps": -r.uniform(0.5, 3, (B, N)),
            "source_rejected_logps": -r.uniform(0.5, 3, (B, N)),
        }
    if kind == "scores":
        return {"chosen_win_probs": r.uniform(0, 1, B), "rejected_win_probs": r.uniform(0, 1, B)}
    if kind == "visits":
        return {
            "chosen_visits": r.integers(0, 6, B).astype(np.int32),
            "rejected_visits": r.integers(0, 6, B).astype(np.int32),
        }
    if kind == "wpo":
        return {"chosen_wpo_logps": r.uniform(-2, 1, B), "rejected_wpo_logps": r.uniform(-2, 1, B)}
    if kind == "sem":
        return {"semantic_distance": r.uniform(0, 1, B)}
    if kind == "rationale":
        return {"rationale_logps": -r.uniform(1, 30, B)}
    if kind == "degree":
        return {
            "degree_logits": r.normal(0, 1, (B, 3)),
            "degree_labels": r.integers(0, 3, B).astype(np.int32),
        }
    if kind == "instr":
        return {
            k: -r.uniform(1, 20, B)
            for k in (
                "chosen_instruction_logps",
                "rejected_instruction_logps",
                "ref_chosen_instruction_logps",
                "ref_rejected_instruction_logps",
            )
        }
    raise KeyError(kind)


def _listwise_inputs(seed):
    r = np.random.default_rng(200 + seed)
    mask = np.ones((B, K), np.int32)
    mask[0, -1] = mask[2, -2:] = 0
    q = r.dirichlet(np.ones(K), B) * mask
    q[1, 0] = 0.0  # a zero target on a valid candidate
    q = q / q.sum(-1, keepdims=True)
    return {
        "logps": -r.uniform(5, 30, (B, K)),
        "ref_logps": -r.uniform(5, 30, (B, K)),
        "target_probs": q,
        "candidate_mask": mask,
    }


def _token_inputs(seed):
    r = np.random.default_rng(300 + seed)

    def mask(n):
        return (np.arange(T)[None, :] < n[:, None]).astype(np.float64)

    cm, rm = mask(r.integers(1, T + 1, B)), mask(r.integers(1, T + 1, B))
    tok = lambda m: -r.uniform(0.1, 4, (B, T)) * m
    return {
        "chosen_token_logps": tok(cm),
        "rejected_token_logps": tok(rm),
        "ref_chosen_token_logps": tok(cm),
        "ref_rejected_token_logps": tok(rm),
        "chosen_mask": cm,
        "rejected_mask": rm,
    }


@dataclasses.dataclass
class Case:
    id: str
    fn: Callable
    ref: Callable
    hyper: dict = dataclasses.field(default_factory=dict)
    extra: str | None = None


def _nll(a):
    return -a["chosen_logps"] / _n(a["chosen_lengths"])


def _wpo_w(a0):
    return np.minimum(1.0, np.exp(a0["chosen_wpo_logps"] + a0["rejected_wpo_logps"]))


def _degree_ce(a):
    z = a["degree_logits"]
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(B), a["degree_labels"]]


def _joint(a):
    b = dict(a)
    for k in ("chosen", "rejected"):
        b[f"{k}_logps"] = a[f"{k}_logps"] + a[f"{k}_instruction_logps"]
        b[f"ref_{k}_logps"] = a[f"ref_{k}_logps"] + a[f"ref_{k}_instruction_logps"]
    return b


P = losses.pairwise
CASES = [
    Case("dpo", P.dpo, np_dpo),
    Case("cdpo", P.dpo, lambda a, a0: np_dpo(a, a0, 0.2, 0.2), {"beta": 0.2, "label_smoothing": 0.2}),
    Case("dpo_fkl", P.dpo, lambda a, a0: np_dpo(a, a0, kind="forward_kl"), {"f_divergence": "forward_kl"}),
    Case(
        "dpo_js", P.dpo, lambda a, a0: np_dpo(a, a0, kind="js_divergence"), {"f_divergence": "js_divergence"}
    ),
    Case(
        "dpo_alpha",
        P.dpo,
        lambda a, a0: np_dpo(a, a0, kind="alpha", alpha=0.3),
        {"f_divergence": "alpha_divergence", "f_alpha": 0.3},
    ),
    Case("hinge", P.slic, lambda a, a0: np.maximum(0, 1 - 0.5 * np.subtract(*_cd(a))), {"beta": 0.5}),
    Case("ipo", P.ipo, np_ipo),
    Case(
        "ipo_js", P.ipo, lambda a, a0: np_ipo(a, a0, kind="js_divergence"), {"f_divergence": "js_divergence"}
    ),
    Case("exo_pair", P.exo, np_exo, {"label_smoothing": 0.1}),
    Case(
        "nca_pair",
        P.nca,
        lambda a, a0: -ls(0.1 * _cd(a)[0]) - 0.5 * ls(-0.1 * _cd(a)[0]) - 0.5 * ls(-0.1 * _cd(a)[1]),
    ),
    Case("robust", P.robust_dpo, np_robust, {"label_smoothing": 0.1}),
    Case("bco_pair", P.bco_pair, lambda a, a0: -ls(0.1 * _cd(a)[0]) - ls(-0.1 * _cd(a)[1])),
    Case("sppo_hard", P.sppo_hard, lambda a, a0: (_cd(a)[0] - 5) ** 2 + (_cd(a)[1] + 5) ** 2),
    Case("aot", P.aot, np_aot, {"label_smoothing": 0.1}),
    Case("aot_unpaired", P.aot_unpaired, lambda a, a0: np_aot(a, a0, paired=False), {"label_smoothing": 0.1}),
    Case("apo_zero", P.apo_zero, lambda a, a0: 1 - sig(0.1 * _cd(a)[0]) + sig(0.1 * _cd(a)[1])),
    Case("apo_down", P.apo_down, lambda a, a0: sig(0.1 * _cd(a)[0]) + 1 - sig(0.1 * np.subtract(*_cd(a)))),
    Case("discopop", P.discopop, np_discopop),
    Case(
        "sigmoid_norm",
        P.ln_dpo,
        lambda a, a0: (
            -ls(0.1 * (_cd(a)[0] / _n(a["chosen_lengths"]) - _cd(a)[1] / _n(a["rejected_lengths"])))
        ),
    ),
    Case(
        "split_beta",
        P.dpo_split_beta,
        lambda a, a0: -ls(0.2 * _cd(a)[0] - 0.05 * _cd(a)[1]),
        {"beta_chosen": 0.2},
    ),
    Case("gamma_dpo", P.gamma_dpo, np_gamma),
    Case(
        "gamma_dpo_rank", P.gamma_dpo, lambda a, a0: np_gamma(a, a0, ranking=True), {"ranking_margin": True}
    ),
    Case("adpo_soft", P.adpo, lambda a, a0: np_adpo(a, a0, tau=5.0), {"tau": 5.0}, "q"),
    Case("adpo_hard", P.adpo, lambda a, a0: np_adpo(a, a0, soft=False)),
    Case("infifpo_mean", P.infifpo, np_infifpo, {"fusion": "mean"}, "sources"),
    Case("infifpo_max", P.infifpo, lambda a, a0: np_infifpo(a, a0, fusion="max"), {}, "sources"),
    Case(
        "infifpo_noclip",
        P.infifpo,
        lambda a, a0: np_infifpo(a, a0, fusion="mean", clip=False),
        {"fusion": "mean", "clip": False},
        "sources",
    ),
    Case("gpo_square", P.gpo_square, np_gpo, {}, "scores"),
    Case("simpo", losses.reference_free.simpo, np_simpo),
    Case(
        "cpo",
        losses.reference_free.cpo,
        lambda a, a0: -ls(0.1 * (a["chosen_logps"] - a["rejected_logps"])) + _nll(a),
    ),
    Case("orpo", losses.reference_free.orpo, np_orpo),
    Case("alphapo", losses.reference_free.alphapo, np_alphapo),
    Case("alphapo0", losses.reference_free.alphapo, lambda a, a0: np_alphapo(a, a0, alpha=0), {"alpha": 0.0}),
    Case("mcts_dpo", losses.step_level.mcts_dpo, np_mcts, {}, "visits"),
    Case("rpo", modifiers.rpo, lambda a, a0: np_dpo(a, a0) + _nll(a)),
    Case("wpo", modifiers.wpo, lambda a, a0: np_dpo(a, a0) * _wpo_w(a0), {}, "wpo"),
    Case(
        "sem_dpo",
        modifiers.sem_dpo,
        lambda a, a0: np_dpo(a, a0) * np.exp(-2.0 * a0["semantic_distance"]),
        {"sem_alpha": 2.0},
        "sem",
    ),
    Case(
        "rationale_dpo",
        modifiers.rationale_dpo,
        lambda a, a0: np_dpo(a, a0) - 0.1 * a["rationale_logps"],
        {},
        "rationale",
    ),
    Case("spo", modifiers.spo, lambda a, a0: np_dpo(a, a0) + 0.1 * _degree_ce(a), {}, "degree"),
    Case("dove", modifiers.dove, lambda a, a0: np_dpo(_joint(a), a0), {}, "instr"),
    Case(
        "ipo_nll_wpo",
        modifiers.with_nll(modifiers.with_wpo_weights(P.ipo), weight=0.5),
        lambda a, a0: np_ipo(a, a0) * _wpo_w(a0) + 0.5 * _nll(a),
        {},
        "wpo",
    ),
]


def _call_args(fn, a):
    """Only the inputs the function declares (the trainer's contract: spec.required + optional)."""
    import inspect

    names = inspect.signature(fn).parameters
    return {k: v for k, v in a.items() if k in names}


def _check(fn, ref, hyper, a, *, rtol=2e-5, atol=2e-5, grad=True, no_grad=()):
    a = _call_args(fn, a)
    ja = {k: jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32) for k, v in a.items()}
    expected = ref(a, a)
    f = lambda arrays: fn(**arrays, **hyper)
    eager = f(ja)
    jitted = jax.jit(f)(ja)
    assert eager.dtype == jnp.float32 and eager.shape == expected.shape
    np.testing.assert_allclose(eager, expected, rtol=rtol, atol=atol)
    np.testing.assert_allclose(jitted, expected, rtol=rtol, atol=atol)
    if not grad:
        return
    floats = [k for k, v in a.items() if v.dtype.kind == "f" and not k.endswith("_mask") and k not in no_grad]
    w = np.random.default_rng(7).uniform(0.5, 1.5, expected.shape)

    def total(fa):
        return jnp.sum(fn(**{**ja, **fa}, **hyper) * w)

    g = jax.jit(jax.grad(total))({k: ja[k] for k in floats})
    for k in floats:
        num = np.zeros_like(a[k])
        for idx in np.ndindex(a[k].shape):
            h = 1e-5 * max(1.0, abs(a[k][idx]))
            hi, lo = dict(a), dict(a)
            hi[k], lo[k] = a[k].copy(), a[k].copy()
            hi[k][idx] += h
            lo[k][idx] -= h
            num[idx] = (np.sum(ref(hi, a) * w) - np.sum(ref(lo, a) * w)) / (2 * h)
        scale = max(1.0, float(np.max(np.abs(num))))
        np.testing.assert_allclose(g[k], num, rtol=2e-3, atol=2e-3 * scale, err_msg=f"d/d{k}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_against_numpy(case):
    a = _inputs(len(case.id))
    if case.extra:
        a.update(_extra(len(case.id), case.extra))
    _check(case.fn, case.ref, case.hyper, a)


def test_listwise_against_numpy():
    # no finite differences w.r.t. the targets: q log q has an infinite slope at the q = 0 entries
    _check(losses.listwise.adpo_listwise, np_listwise, {}, _listwise_inputs(0), no_grad=("target_probs",))


def test_ld_dpo_against_numpy():
    _check(modifiers.ld_dpo, np_ld_dpo, {}, _token_inputs(0))


def test_ld_reference_free_composition():
    """length_desensitized on a reference-free loss drops the summed inputs and adds no ref_* inputs."""
    fn = modifiers.length_desensitized(losses.reference_free.simpo, alpha=0.3)
    req = losses.registry._spec("x", fn, "t", False).required
    assert not any(r.startswith("ref_") for r in req) and "chosen_logps" not in req
    a = _token_inputs(1)
    a["chosen_lengths"] = a["chosen_mask"].sum(-1).astype(np.int32)
    a["rejected_lengths"] = a["rejected_mask"].sum(-1).astype(np.int32)

    def ref(a, a0):
        cm, rm = a["chosen_mask"], a["rejected_mask"]
        s1, t1 = np_ld(a["chosen_token_logps"], cm, rm)
        s2, t2 = np_ld(a["rejected_token_logps"], rm, cm)
        return np_simpo({**a, "chosen_logps": s1 + 0.3 * t1, "rejected_logps": s2 + 0.3 * t2}, a0)

    _check(fn, ref, {}, a)


# ----------------------------------------------------------------------------- dtypes and extremes

DTYPE_CASES = [
    c for c in CASES if c.id in ("dpo", "ipo", "exo_pair", "simpo", "orpo", "infifpo_max", "mcts_dpo")
]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    """bf16/fp16 inputs: the loss is fp32 and equals the fp32 computation on the rounded inputs."""
    for case in DTYPE_CASES:
        a = _inputs(1)
        if case.extra:
            a.update(_extra(1, case.extra))
        a = _call_args(case.fn, a)
        low = {k: jnp.asarray(v, dtype) if v.dtype.kind == "f" else jnp.asarray(v) for k, v in a.items()}
        rounded = {
            k: np.asarray(v, np.float64) if v.dtype != jnp.int32 else np.asarray(v) for k, v in low.items()
        }
        out = jax.jit(lambda x, fn=case.fn, h=case.hyper: fn(**x, **h))(low)
        assert out.dtype == jnp.float32, case.id
        np.testing.assert_allclose(out, case.ref(rounded, rounded), rtol=1e-4, atol=1e-4, err_msg=case.id)


def test_extreme_inputs_are_finite():
    """Log-probs of -1e4 (policy and reference far apart), lengths 0: finite losses and gradients."""
    for case in CASES:
        a = _inputs(2)
        if case.extra:
            a.update(_extra(2, case.extra))
        a["chosen_logps"] = np.full(B, -1e4)
        a["ref_rejected_logps"] = np.full(B, -1e4)
        a["chosen_lengths"] = np.zeros(B, np.int32)
        a = _call_args(case.fn, a)
        ja = {k: jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32) for k, v in a.items()}
        floats = {k: v for k, v in ja.items() if v.dtype == jnp.float32}
        val, g = jax.value_and_grad(
            lambda f, fn=case.fn, h=case.hyper, ja=ja: jnp.sum(fn(**{**ja, **f}, **h))
        )(floats)
        assert np.isfinite(val), case.id
        assert all(np.all(np.isfinite(v)) for v in g.values()), case.id


def test_zero_lengths_clamp_to_one():
    a = _inputs(3)
    for fn in (P.ipo, P.ln_dpo, losses.reference_free.simpo, losses.reference_free.orpo):
        args = _call_args(fn, a)
        zero = {**args, "chosen_lengths": np.zeros(B, np.int32), "rejected_lengths": np.zeros(B, np.int32)}
        one = {**args, "chosen_lengths": np.ones(B, np.int32), "rejected_lengths": np.ones(B, np.int32)}
        np.testing.assert_array_equal(fn(**zero), fn(**one))


@pytest.mark.parametrize(
    "fn,hyper,match",
    [
        (P.exo, {"label_smoothing": 0.0}, "exo_pair needs label_smoothing in \\(0, 1\\)"),
        (P.exo, {"label_smoothing": 1.0}, "label_smoothing"),
        (P.robust_dpo, {"label_smoothing": 0.5}, "label_smoothing must be in \\[0, 0.5\\)"),
        (P.dpo, {"label_smoothing": -0.1}, "label_smoothing must be in \\[0, 1\\]"),
        (P.dpo, {"f_divergence": "kl"}, "f_divergence must be one of"),
    ],
)
def test_bad_hyperparameters_raise(fn, hyper, match):
    with pytest.raises(ValueError, match=match):
        fn(**_call_args(fn, _inputs(0)), **hyper)


def test_eps_bounds_are_finite():
    a = _call_args(P.dpo, _inputs(4))
    for eps in (0.0, 1.0):
        assert np.all(np.isfinite(P.dpo(**a, label_smoothing=eps)))
    assert np.all(np.isfinite(P.exo(**a, label_smoothing=1e-7)))
    assert np.all(np.isfinite(P.robust_dpo(**a, label_smoothing=0.49)))


def test_shape_errors_name_the_array():
    a = _call_args(P.dpo, _inputs(0))
    with pytest.raises(ValueError, match="ref_rejected_logps must have shape \\[B\\]"):
        P.dpo(**{**a, "ref_rejected_logps": np.zeros((B, 2))})
    with pytest.raises(AssertionError):
        P.dpo(**{**a, "rejected_logps": np.zeros(B + 1)})
