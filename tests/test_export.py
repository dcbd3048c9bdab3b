"""``python -m alignjax.export``: training workdirs back to Hugging Face, checked with ``transformers``.

A DPO run on a Llama saved by ``transformers`` (tokenizer with a chat template) and a Bradley-Terry
reward-model run are trained for two steps; their exports must load with ``AutoModelForCausalLM`` /
``AutoModelForSequenceClassification`` with no missing or unexpected tensors, give alignjax's
logits / rewards on the same ids, and their tokenizer must load with ``AutoTokenizer`` rendering the
chat template and tokenizing as the original. Bad input: one line, exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alignjax import export
from alignjax import main as entry
from alignjax.data import resolve_tokenizer
from alignjax.jobs import score as score_job
from experiments import dpo as dpo_experiment
from experiments import reward_model as reward_experiment
from experiments import score as score_experiment
from tests import hf_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.array([[1, 5, 9, 17, 33, 60, 2, 4], [1, 7, 7, 40, 12, 3, 100, 8]], np.int32)
MESSAGES = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 3 + 4?"},
]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """Two DPO steps from an HF checkpoint, checkpoints at both steps."""
    root = tmp_path_factory.mktemp("dpo")
    ckpt = hf_fixtures.save_checkpoint(str(root / "ckpt"))
    c = dpo_experiment.get_config("loss=sigmoid,runlocal")
    c.model.path = c.data.tokenizer = ckpt
    c.data.source = hf_fixtures.write_pairs(str(root / "pairs.jsonl"), 16, conversational=True)
    c.data.eval_source, c.data.eval_fraction = "", 0.0
    c.data.batch_size, c.data.max_length = 8, 64
    c.train.num_steps, c.train.checkpoint_every, c.train.eval_every = 2, 1, 0
    c.train.progress = c.train.plot = c.train.tensorboard = False
    c.optim.learning_rate = 1e-2  # the policy moves visibly off the checkpoint
    workdir = str(root / "run")
    entry.run(c, workdir)
    return ckpt, workdir


def _export(argv: list[str], capsys) -> tuple[int, str]:
    code = export.main(argv)
    return code, capsys.readouterr().err


def test_policy_export_loads_in_transformers_with_the_same_logits_and_chat(dpo_run, tmp_path, capsys):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    ckpt, workdir = dpo_run
    out = tmp_path / "hf"
    code, err = _export(
        [f"--workdir={workdir}", f"--out={out}", "--dtype=float32", "--max_shard_size=60KB"], capsys
    )
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).stat().st_size <= 60_000 + 8 * 4096 for s in shards)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )

    run = export.load_run(workdir)
    assert run.step == 2
    ours = np.asarray(run.model.apply(run.params, IDS))
    with torch.no_grad():
        theirs = model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    original = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(original(torch.tensor(IDS, dtype=torch.long)).logits.numpy() - theirs).max() > 1e-3

    tok, ref_tok = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(ckpt)
    for prompt in (False, True):
        rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
        assert rendered == ref_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
    text = "What is the capital of France? Paris."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    hf_config = json.loads((out / "config.json").read_text())
    ids = {k: getattr(ref_tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert {k: hf_config[k] for k in ids} == ids
    generation = GenerationConfig.from_pretrained(str(out))
    assert (generation.bos_token_id, generation.eos_token_id) == (ids["bos_token_id"], ids["eos_token_id"])

    code, err = _export([f"--workdir={workdir}", f"--out={tmp_path / 'bf16'}", "--step=1"], capsys)
    assert code == 0, err
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # the default dtype, one file


def test_score_py_takes_the_workdir_as_its_export(dpo_run, tmp_path, capsys):
    """model=WORKDIR@STEP scores exactly as the fp32 export of that step does."""
    ckpt, workdir = dpo_run
    code, err = _export(
        [f"--workdir={workdir}", f"--out={tmp_path / 'hf'}", "--dtype=float32", "--step=2"], capsys
    )
    assert code == 0, err
    data = hf_fixtures.write_pairs(str(tmp_path / "rb.jsonl"), 6)
    summaries = []
    for model, tokenizer in ((f"{workdir}@2", ckpt), (str(tmp_path / "hf"), str(tmp_path / "hf"))):
        c = score_experiment.get_config(f"model={model},reference={ckpt},source={data}")
        assert c.data.tokenizer == tokenizer  # the workdir's data.tokenizer / the export's own files
        c.data.eval_batch_size = 8
        summaries.append(score_job.run(c, str(tmp_path / f"score{len(summaries)}")))
    assert summaries[0]["reward_margin_mean"] == pytest.approx(summaries[1]["reward_margin_mean"], abs=1e-5)
    assert summaries[0]["reward_margin_mean"] != 0.0  # the trained policy differs from its reference
    entry.validate(score_experiment.get_config(f"model={workdir}@1"))  # main accepts DIR@STEP


def test_reward_model_exports_as_sequence_classifier(tmp_path, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignjax.reward import synthetic

    c = reward_experiment.get_config("objective=bt,runlocal")
    c.model.overrides.update(dict(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2))
    rows, _ = synthetic.linear_bt_pairs(64, weights=synthetic.linear_weights(0))
    c.data.source = synthetic.write_jsonl(rows, str(tmp_path / "pairs.jsonl"))
    c.data.eval_source, c.reward.eval_source, c.data.max_length = "", "", 12
    c.data.batch_size = 16
    c.train.num_steps = c.train.checkpoint_every = 2
    c.train.progress = c.train.plot = c.train.tensorboard = False
    entry.run(c, str(tmp_path / "run"))
    out = tmp_path / "hf"
    code, err = _export([f"--workdir={tmp_path / 'run'}", f"--out={out}", "--dtype=float32"], capsys)
    assert code == 0, err
    hf, info = AutoModelForSequenceClassification.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )
    run = export.load_run(str(tmp_path / "run"))
    pad_id = resolve_tokenizer(run.config["data"]["tokenizer"]).pad_id
    ids = np.array([[4, 5, 13, 6, 7, 2, pad_id, pad_id], [8, 3, 9, 10, 11, 12, 4, 2]], np.int32)
    ours = np.asarray(run.model.rewards(run.params, ids, pad_id=pad_id))
    with torch.no_grad():
        mask = torch.tensor(ids != pad_id, dtype=torch.long)
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=mask).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_bad_input_is_one_line_and_exit_code_2(dpo_run, tmp_path, capsys):
    _, workdir = dpo_run
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text(json.dumps({"job": "train"}))
    cases = {
        f"--workdir={tmp_path / 'missing'}": "no such directory",
        f"--workdir={tmp_path}": "config.json: no such file",
        f"--workdir={empty}": "no checkpoint to load",
        f"--workdir={workdir} --step=7": "no checkpoint at step 7 (steps: [1, 2])",
        f"--workdir={workdir} --max_shard_size=lots": "max_shard_size='lots'",
    }
    for args, message in cases.items():
        code, err = _export([*args.split(), f"--out={tmp_path / 'out'}"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    proc = subprocess.run(
        [sys.executable, "-m", "alignjax.export", f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: give --out (the HF checkpoint) and/or --peft (a LoRA run's adapter) (usage: python -m "
        "alignjax.export --workdir=DIR --out=OUT)"
    ]
    assert not (tmp_path / "out").exists()


def test_export_to_gcs_loads_back(dpo_run, tmp_path):
    """--out=gs://... on a real GCS emulator (fake-gcs-server); the objects load in transformers."""
    from tests.gcs_emulator import Emulator

    try:
        gcs = Emulator()
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"the fake-gcs-server binary could not start: {e}")
    try:
        gcs.create_bucket("exports")
        _, workdir = dpo_run
        env = dict(os.environ, **gcs.env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
        command = [sys.executable, "-m", "alignjax.export", f"--workdir={workdir}", "--out=gs://exports/run"]
        proc = subprocess.run([*command, "--max_shard_size=20KB"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        os.environ.update(gcs.env)  # before gcsfs reads it (its bucket-type probe needs gRPC)
        import gcsfs

        fs = gcsfs.GCSFileSystem(endpoint_url=gcs.url, token="anon")
        local = tmp_path / "back"
        for name in fs.find("exports/run"):
            target = local / os.path.relpath(name, "exports/run")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fs.cat(name))
        assert (local / "model.safetensors.index.json").exists() and (local / "chat_template.jinja").exists()
        from transformers import AutoModelForCausalLM

        _, info = AutoModelForCausalLM.from_pretrained(str(local), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    finally:
        for key in gcs.env:
            os.environ.pop(key, None)
        gcs.stop()


def test_writer_holds_one_tensor_at_a_time(dpo_run, tmp_path):
    """Each tensor is fetched (gathered) just before it is written and dropped after: when the next
    is fetched, no earlier one is alive (weak references to every fetched array)."""
    import dataclasses
    import gc
    import weakref

    from alignjax.models import hf

    class Tracked(np.ndarray):
        pass

    alive: list[weakref.ref] = []
    live_at_fetch: list[int] = []

    def tracked(fetch):
        def wrapped():
            gc.collect()
            live_at_fetch.append(sum(r() is not None for r in alive))
            array = fetch().view(Tracked)
            alive.append(weakref.ref(array))
            return array

        return wrapped

    run = export.load_run(dpo_run[1])
    tensors = [
        dataclasses.replace(t, fetch=tracked(t.fetch))
        for t in hf.decoder_tensors(run.model.config, run.params, "float32")
    ]
    names = hf.write_safetensors(tensors, str(tmp_path / "hf"), dtype="float32", max_shard_size="100KB")
    assert len(names) > 1 and len(live_at_fetch) == len(tensors) > 10
    assert max(live_at_fetch) == 0

