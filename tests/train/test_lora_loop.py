"""LoRA runs end to end through ``alignjax.main``: a runlocal DPO experiment (scanned, remat, bf16
compute, gradient accumulation), killed (SIGKILL) mid-run and restarted, and a LoRA reward model
stopped and continued, each to the same metrics as an uninterrupted run; the DPO run's export as a
merged HF checkpoint and as a PEFT adapter, loaded by transformers + peft."""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.train.test_loop import ROOT, _steps, _wait_for_step

# Width 32, not test_loop's 128: at width 128 the reward model's adapters do not lower its loss in
# 6 steps, which the test checks.
SMALL = [
    "--config.model.overrides.vocab_size=16",
    "--config.model.overrides.hidden_size=32",
    "--config.model.overrides.num_layers=1",
    "--config.model.overrides.num_heads=2",
    "--config.model.overrides.num_kv_heads=2",
    "--config.model.overrides.intermediate_size=64",
]
COMMON = [
    "--config.train.checkpoint_every=2",
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
    "--config.data.max_length=10",
    "--config.train.progress=False",
    "--config.train.tensorboard=False",
    "--config.data.num_eval=16",
    "--config.data.eval_batch_size=16",
    *SMALL,
]
DPO = [
    "--config=experiments/dpo.py:runlocal,steps=6,lora=4",
    "--config.model.scan_layers=True",
    "--config.model.remat=full",
    "--config.model.compute_dtype=bfloat16",
    "--config.optim.grad_accum_steps=2",
    "--config.optim.learning_rate=0.01",
]


def _start(workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen(
        [sys.executable, "-m", "alignjax.main", *DPO, *COMMON, f"--workdir={workdir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _reward_config(steps):
    from alignjax import main as entry

    c = entry.load_config_file("experiments/reward_model.py:objective=bt,runlocal,lora=4")
    for flag in COMMON:
        key, value = flag.removeprefix("--config.").split("=")
        section, *rest = key.split(".")
        node = c[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = (
            type(node[rest[-1]])(value) if not isinstance(node[rest[-1]], bool) else value == "True"
        )
    c.train.num_steps = steps
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The DPO runs as processes (one SIGKILLed at step 3 and restarted); meanwhile the reward-model
    runs in this process (one stopped after 3 steps, then continued to 6)."""
    from alignjax import main as entry

    base = tmp_path_factory.mktemp("lora_loop")
    dirs = {name: str(base / name) for name in ("dpo_clean", "dpo_killed", "rm_clean", "rm_killed")}
    clean, killed = _start(dirs["dpo_clean"]), _start(dirs["dpo_killed"])
    _wait_for_step(killed, dirs["dpo_killed"], 3)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _start(dirs["dpo_killed"])
    entry.run(_reward_config(6), dirs["rm_clean"])
    entry.run(_reward_config(3), dirs["rm_killed"])
    entry.run(_reward_config(6), dirs["rm_killed"])  # resumes from step 3
    for proc in (clean, resumed):
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out
    return dirs


@pytest.mark.parametrize("name", ["dpo", "rm"])
def test_killed_lora_run_resumes_to_the_uninterrupted_metrics(runs, name):
    clean, killed = _steps(runs[f"{name}_clean"]), _steps(runs[f"{name}_killed"])
    if name == "rm":  # the run stopped at step 3 also evaluated there, as a finished run does
        clean, killed = ([r for r in rows if "loss" in r] for rows in (clean, killed))
    assert [r["step"] for r in clean if "loss" in r] == list(range(1, 7))
    assert clean == killed
    losses = [r["loss"] for r in clean if "loss" in r]
    assert losses[-1] < losses[0]  # the adapters learn
    if name == "dpo":  # B = 0 at step 1: the policy is its reference (the base) bitwise
        assert losses[0] == float(np.float32(math.log(2)))


def test_lora_checkpoint_holds_the_trainable_state_only(runs):
    import orbax.checkpoint as ocp

    item = os.path.join(runs["dpo_clean"], "checkpoints", "6", "state")
    meta = ocp.StandardCheckpointer().metadata(item)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    assert "ref_params" not in tree
    for part in ("opt_state", "params"):  # the adapters and their moments; no base weight
        flat = json.dumps(jax_paths(tree[part]))
        assert "lora_a" in flat and "'kernel'" not in flat and "embedding" not in flat, part
    with open(os.path.join(runs["dpo_clean"], "checkpoints", "6", "manifest", "metadata")) as f:
        manifest = json.load(f)
    assert len(manifest["base_fingerprint"]) > 0


def jax_paths(tree):
    import jax

    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_lora_run_exports_merged_and_as_a_peft_adapter(runs, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import jax

    from alignjax.export import load_run, main
    from alignjax.models import Model, lora, save_pretrained

    workdir = runs["dpo_clean"]
    assert main([f"--workdir={workdir}", f"--out={tmp_path / 'merged'}", "--dtype=float32"]) == 0
    assert main([f"--workdir={workdir}", f"--peft={tmp_path / 'adapter'}"]) == 0
    run = load_run(workdir)
    base_model = Model(run.model.config.replace(lora=None), mesh=run.model.mesh)
    save_pretrained(base_model, lora.strip_adapters(run.params), tmp_path / "base", dtype="float32")
    ids = np.array([[1, 5, 3, 7, 2, 9, 4, 6]])
    run_fp32 = Model(run.model.config.replace(dtype="float32"), mesh=run.model.mesh)
    ours = np.asarray(jax.jit(run_fp32.apply)(run.params, ids))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "merged", torch_dtype=torch.float32
        )
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
        np.testing.assert_allclose(adapted(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)


def test_lora_reference_cache_equals_the_base_reference_and_bad_settings_are_named(tmp_path):
    from alignjax.train.loop import run_train
    from tests.train.test_loop import _inprocess_config

    def config(steps=2, **changes):
        c = _inprocess_config(train__num_steps=steps, **changes)
        c.model.lora.rank = 4
        c.optim.learning_rate, c.optim.warmup_steps = 0.01, 0
        return c

    run_train(config(), str(tmp_path / "frozen"))
    run_train(
        config(reference__kind="cache", reference__cache_dir=str(tmp_path / "c")), str(tmp_path / "cached")
    )
    frozen, cached = (_steps(str(tmp_path / n)) for n in ("frozen", "cached"))
    rows = [(a, b) for a, b in zip(frozen, cached) if "loss" in a]
    assert len(rows) == 2 and rows[1][0]["rewards/margins"] != 0.0  # step 2: policy != reference
    for a, b in rows:  # the cache holds the base's log-probs, as the frozen LoRA reference computes
        assert b["loss"] == a["loss"] and b["rewards/margins"] == a["rewards/margins"]
    from alignjax.train.checkpoint import CheckpointMismatch

    with pytest.raises(CheckpointMismatch, match="adapters trained on another base model"):
        other = config(steps=3)
        other.seed = 5  # another random base
        run_train(other, str(tmp_path / "frozen"))
    with pytest.raises(ValueError, match=r"config.reference.kind='ema' with config.model.lora.rank > 0"):
        run_train(config(reference__kind="ema"), str(tmp_path / "ema"))
    bad = config()
    bad.model.lora.targets = "qkv"
    with pytest.raises(ValueError, match=r"config.model.lora.targets='qkv' matches no projection"):
        run_train(bad, str(tmp_path / "bad"))


def test_qlora_run_on_an_hf_checkpoint_exports_from_its_rebuilt_base(tmp_path, quantize="nf4"):
    """A QLoRA run on an HF directory: its checkpoint has no base, and ``load_run`` rebuilds the
    quantized base from the directory to exactly the params the run ended with."""
    import jax

    from alignjax import main as entry
    from alignjax.export import load_run
    from tests import hf_fixtures
    from tests.train.test_loop import _inprocess_config

    hf_dir = hf_fixtures.save_checkpoint(str(tmp_path / "ckpt"))
    c = _inprocess_config(train__num_steps=2)
    c.model.path, c.data.tokenizer = hf_dir, hf_dir
    c.data.source = hf_fixtures.write_pairs(str(tmp_path / "pairs.jsonl"), 32)
    c.data.eval_source, c.data.eval_fraction, c.data.max_length = "", 0.0, 32
    c.model.lora.update(rank=4, quantize=quantize)
    c.optim.learning_rate, c.optim.warmup_steps = 0.01, 0
    result = entry.run(c, str(tmp_path / "run"))
    run = load_run(str(tmp_path / "run"))
    trained = jax.device_get(result.params)
    restored = jax.device_get(run.params)
    assert jax.tree.structure(trained) == jax.tree.structure(restored)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    kernel = restored["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == (np.uint8 if quantize == "nf4" else np.float32)
