"""InfiFPO's source log-probs: the ``source_logps`` job against ``transformers``, and InfiFPO with one
source equal to the reference trains exactly as length-normalised DPO."""

import json

import numpy as np
import pytest

from alignjax.main import load_config_file
from alignjax.train.loop import run_train
from tests import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROWS = 10


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two HF checkpoints as transformers saves them, with tokenizers of different vocabularies."""
    root = tmp_path_factory.mktemp("sources")
    paths = []
    for seed, vocab in ((0, 320), (1, 300)):
        path = str(root / f"source{seed}")
        tok = hf_fixtures.save_tokenizer(path, vocab_size=vocab)
        hf_fixtures.save_llama(path, vocab_size=len(tok), seed=seed, tokenizer=tok)
        paths.append(path)
    data = hf_fixtures.write_pairs(str(root / "pairs.jsonl"), n=ROWS)
    return paths, data


def _hf_mean_logp(path, prompt, completion):
    """TRL's standard-row tokenization (prompt ids; prompt + completion + EOS text) and the mean
    completion-token log-prob under the transformers model."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    p = tok(prompt)["input_ids"]
    full = tok(prompt + completion + tok.eos_token)["input_ids"]
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    token = [logp[t - 1, full[t]].item() for t in range(n, len(full))]
    return float(np.mean(token))


def _run_job(paths, data, workdir):
    config = load_config_file(f"experiments/source_logps.py:models={'+'.join(paths)},source={data}")
    config.data.eval_batch_size = 4
    from alignjax.jobs.annotate import run_source_logps

    return run_source_logps(config, str(workdir))


def test_each_sources_value_is_its_transformers_models_mean_completion_logprob(sources, tmp_path):
    paths, data = sources
    summary = _run_job(paths, data, tmp_path)
    assert summary["rows_in"] == summary["rows_out"] == ROWS
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    inputs = [json.loads(line) for line in open(data)]
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == inputs
    for row in rows[:3]:
        for j, path in enumerate(paths):
            for side in ("chosen", "rejected"):
                want = _hf_mean_logp(path, row["prompt"], row[side])
                assert row["source_logps"][side][j] == pytest.approx(want, rel=2e-5), (path, side)
    assert rows[0]["source_logps"]["chosen"][0] != pytest.approx(rows[0]["source_logps"]["chosen"][1])


def test_infifpo_with_the_reference_as_its_only_source_trains_as_length_normalised_dpo(sources, tmp_path):
    """One source that is the initial policy (= the reference), no clipping: InfiFPO's fused reference
    is the reference's mean token log-prob, so three steps give ln_dpo's losses."""
    (model, _), pairs = sources
    _run_job([model], pairs, tmp_path / "sources")
    data = str(tmp_path / "sources" / "pairs.jsonl")
    losses = {}
    for name, extra in (("infifpo", dict(fusion="mean", clip=False)), ("ln_dpo", {})):
        c = load_config_file(f"experiments/dpo.py:runlocal,steps=3,loss={name},model={model},source={data}")
        c.data.tokenizer = model
        c.data.eval_source = ""
        c.data.max_length = 32
        c.optim.warmup_steps = 0
        c.loss.update(dict(beta=0.5, **extra))
        c.train.update(dict(checkpoint_every=3, progress=False, tensorboard=False, plot=False,
                            async_checkpoints=False))
        run_train(c, str(tmp_path / name))
        rows = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["infifpo"]) == 3 and losses["infifpo"][0] == pytest.approx(np.log(2.0), rel=1e-6)
    np.testing.assert_allclose(losses["infifpo"], losses["ln_dpo"], rtol=1e-5)
