"""Reward sources against code alignjax did not write: transformers' Llama (implicit DPO reward, follow-up
likelihood) and LlamaForSequenceClassification (an exported reward model) on the same weights, the
built-in verifiers on known answers, scipy's z-score for the normalisation."""

import jax
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from alignjax.models import from_pretrained, save_pretrained
from alignjax.models.heads import HeadConfig
from alignjax.online import rewards
from alignjax.reward.export import save_classifier
from alignjax.reward.model import RewardModel

PROMPT_IDS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
COMPLETION_IDS = [[20, 21], [22, 23, 24, 2], [25]]


def _samples():
    return rewards.Samples(["a", "b", "c"], ["x", "y", "z"], PROMPT_IDS, COMPLETION_IDS)


def _hf_sum_logps(hf, prefix, target):
    ids = torch.tensor([list(prefix) + list(target)])
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=ids).logits[0, :-1].double(), -1)
    return float(sum(lp[len(prefix) - 1 + i, t] for i, t in enumerate(target)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    policy = from_pretrained("tiny")
    ref_params = jax.tree.map(lambda x: x * 1.1, policy.params)
    hf = []
    for name, params in (("pi", policy.params), ("ref", ref_params)):
        path = str(tmp_path_factory.mktemp(name))
        save_pretrained(policy, params, path)
        hf.append(transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    return policy, ref_params, hf


def test_implicit_dpo_reward_equals_transformers(pair):
    policy, ref_params, (hf_pi, hf_ref) = pair
    got = rewards.ImplicitDPOReward(policy, policy.params, ref_params, beta=0.3)(_samples())
    want = [0.3 * (_hf_sum_logps(hf_pi, p, c) - _hf_sum_logps(hf_ref, p, c))
            for p, c in zip(PROMPT_IDS, COMPLETION_IDS)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("normalize", [True, False])
def test_follow_up_likelihood_equals_transformers(pair, normalize):
    policy, _, (hf_pi, _) = pair
    pos, neg, sep = [[30, 31, 32], [33]], [[40, 41]], [3]
    src = rewards.FollowUpLikelihoodReward(policy, policy.params, pos, neg, separator=sep,
                                           length_normalize=normalize)
    got = src(_samples())
    want = []
    for p, c in zip(PROMPT_IDS, COMPLETION_IDS):
        prefix = list(p) + list(c) + sep
        scale = lambda f: len(f) if normalize else 1
        ll = [[_hf_sum_logps(hf_pi, prefix, f) / scale(f) for f in fs] for fs in (pos, neg)]
        want.append(np.mean(ll[0]) - np.mean(ll[1]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_reward_model_equals_exported_classifier(pair, tmp_path):
    policy, _, _ = pair
    rm = RewardModel(policy, HeadConfig(kind="value", num_heads=1))
    params = rm.init(jax.random.PRNGKey(0))
    params["head"] = jax.tree.map(lambda x: x * 50.0, params["head"])
    save_classifier(rm, jax.tree.map(np.asarray, params), str(tmp_path), pad_token_id=0)
    got = rewards.RewardModelReward.from_dir(str(tmp_path))(_samples())
    direct = rewards.RewardModelReward(rm, params)(_samples())
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path), dtype=torch.float32)
    want = []
    for p, c in zip(PROMPT_IDS, COMPLETION_IDS):
        with torch.no_grad():
            want.append(float(hf.eval()(input_ids=torch.tensor([p + c])).logits[0, 0]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(direct, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'gpm' head"):
        rewards.RewardModelReward(RewardModel(policy, HeadConfig(kind="gpm")), params)


def test_builtin_verifiers():
    v = rewards.VerifierReward(rewards.builtin_verifier("arithmetic"), correct=1.0, wrong=-1.0)
    s = rewards.Samples(["18+25=", "18+25=", "18+25="], ["340<eos>", "330", "3+"], [[1]] * 3, [[1]] * 3)
    assert v(s).tolist() == [1.0, -1.0, -1.0]
    m = rewards.VerifierReward(rewards.builtin_verifier("multistep"))
    s = rewards.Samples(["1+2+3="] * 2, ["1+2=3\n3+3=6\nanswer 6", "answer 5"], [[1]] * 2, [[1]] * 2)
    assert m(s).tolist() == [1.0, 0.0]
    g = rewards.VerifierReward(rewards.gsm8k_verifier({"q": "42"}))
    assert g(rewards.Samples(["q", "q"], ["so #### 42", "#### 41"], [[1]] * 2, [[1]] * 2)).tolist() == [1, 0]
    with pytest.raises(ValueError, match="unknown built-in verifier 'chess'"):
        rewards.builtin_verifier("chess")


def test_normalize_rewards_is_scipy_zscore():
    r = np.random.default_rng(0).normal(size=12).astype(np.float32)
    np.testing.assert_allclose(rewards.normalize_rewards(r, "batch"), scipy.stats.zscore(r), rtol=1e-5)
    want = np.concatenate([scipy.stats.zscore(g) for g in r.reshape(3, 4)])
    np.testing.assert_allclose(rewards.normalize_rewards(r, "group", num_generations=4), want, rtol=1e-5)
    r[3] = np.nan
    got = rewards.normalize_rewards(r, "batch")
    assert np.isnan(got[3])
    np.testing.assert_allclose(np.delete(got, 3), scipy.stats.zscore(np.delete(r, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match="'whiten'"):
        rewards.normalize_rewards(r, "whiten")
