"""The DPO-step benchmark compares like with like: alignjax's jitted step and the PyTorch/TRL baseline
(``bench/common.py``) compute the same loss, gradient norm and AdamW trajectory on the same weights and
batch, and the FLOP accounting counts what it says it counts."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

from alignjax.models import from_pretrained, save_pretrained

# bench/ is a folder of scripts, not a package: load its common module by path.
_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "common.py")
_SPEC = importlib.util.spec_from_file_location("alignjax_bench_common", _PATH)
bc = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bc  # dataclasses look their module up here
_SPEC.loader.exec_module(bc)

pytest.importorskip("torch")
pytest.importorskip("transformers")

STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = from_pretrained("tiny")
    # 8 pairs: the alignjax side runs data-parallel on the 8-device CPU mesh of tests/conftest.py.
    examples = bc.synthetic_pairs(8, prompt_length=6, completion_length=10, vocab_size=256, seed=1)
    host = bc.layout_batch(examples, "padded", max_length=16)
    path = str(tmp_path_factory.mktemp("tiny_hf"))
    save_pretrained(model, model.params, path)
    return model, host, path


def _trajectory(runner) -> list[tuple[float, float]]:
    out = []
    for _ in range(STEPS):
        runner.step()
        runner.sync()
        v = runner.values()
        out.append((v["loss"], v["grad_norm"]))
    return out


@pytest.mark.parametrize("reference", ["model", "batch"])
@pytest.mark.parametrize("counted_only", [False, True], ids=["all-positions", "counted-only"])
def test_torch_baseline_matches_alignjax_step(setup, reference, counted_only):
    """Loss and pre-clip gradient norm agree at every step of 3 (so the clipped AdamW updates agree
    too); the first loss is log 2 (policy = reference). ``counted-only``: alignjax's head at the
    counted tokens only (``logit_width``, what ``data.max_completion_length`` sets) against TRL's
    ``use_logits_to_keep`` on ``transformers``' own ``logits_to_keep``."""
    model, host, path = setup
    width = int((host["loss_mask"] > 0).sum(axis=1).max()) if counted_only else None
    assert width is None or width < host["input_ids"].shape[1]
    jx = bc.JaxDPO(model, model.params, host, reference=reference, logit_width=width)
    torch_batch = jx.add_reference_cache(model.params, host) if reference == "batch" else host
    pt = bc.TorchDPO(path, torch_batch, reference=reference, threads=2, logits_to_keep=counted_only)
    got_jax, got_torch = _trajectory(jx), _trajectory(pt)
    np.testing.assert_allclose(got_jax[0][0], np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(np.array(got_jax), np.array(got_torch), rtol=2e-5, atol=2e-6)
    assert got_jax[-1][0] < got_jax[0][0] - 0.1  # the steps really train (lr 1e-3)


def test_in_memory_weights_equal_disk_weights(setup):
    """The GPU script's in-memory export (``hf_state_dict`` + ``config.to_hf``) gives the torch model
    the same weights as ``save_pretrained`` + ``from_pretrained``."""
    model, host, path = setup
    disk = bc.TorchDPO(path, host, reference="none", threads=2)
    mem = bc.TorchDPO(
        (model.config.to_hf(), bc.hf_state_dict(model, model.params)), host, reference="none", threads=2
    )
    a, b = disk.policy.state_dict(), mem.policy.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    disk.step(), mem.step()
    np.testing.assert_allclose(disk.values()["loss"], mem.values()["loss"], rtol=1e-6)


def test_sequence_tokens_count_a_shared_prompt_once_per_sequence():
    """tokens/s compares across layouts: the shared-prompt layout reports the tokens of the logical
    chosen + rejected sequences, as the padded layout does. (FLOP accounting: tests/test_flops.py.)"""
    examples = bc.synthetic_pairs(2, prompt_length=6, completion_length=10, vocab_size=256, seed=1)
    shared = bc.layout_batch(examples, "shared_prompt", max_length=16)
    padded = bc.layout_batch(examples, "padded", max_length=16)
    assert bc.sequence_tokens(shared) == bc.sequence_tokens(padded) == 2 * 2 * (6 + 10)


def test_gpu_script_smoke_run_reports_profile_and_numerics(tmp_path):
    """``bench/gpu_dpo_step.py --smoke`` (the GPU script on a 2-layer model, run on CPU so the script
    cannot rot between device sessions): the timing rows, the kernel profile and the log-prob
    numerics come back, and with strict rounding the policy and reference forwards agree exactly."""
    import json
    import math
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu_dpo_step.py")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device, as on a GPU machine
    cmd = [sys.executable, script, "--smoke", f"--out={tmp_path}", "--numerics"]
    cmd.append("--variants=excess-precision")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_dpo_step.json").read_text())
    main = {r["variant"]: r for r in report["results"][0]["rows"]}
    assert set(main) == {"alignjax", "pytorch"} and main["alignjax"]["tokens_per_s"] > 0
    for row in main.values():  # policy = reference at step 1: DPO's loss is log 2
        assert row["first_step"]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    variants = {r["variant"] for r in report["results"][1]["rows"]}
    assert variants == {"alignjax", "alignjax excess-precision"}
    assert report["kernels"]["busy_ms_per_step"] > 0 and report["kernels"]["top_kernels"]
    strict = report["numerics"]["strict"]
    assert strict["policy_minus_reference"] == [0.0] * len(report["numerics"]["fp32"])
    assert max(abs(d) for d in strict["policy_minus_fp32"]) < 0.1  # bf16 sums of ~200 nats
    assert {"trace.json.gz", "step_hlo.txt.gz"} <= {p.name for p in tmp_path.iterdir()}
