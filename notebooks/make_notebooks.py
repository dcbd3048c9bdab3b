# ruff: noqa: E501  (notebook cell sources are kept as they read in the notebook)
"""Writes notebooks/*.ipynb from the cell sources below and executes each one in place, so the
repository stores them with their outputs: ``make notebooks`` (``python notebooks/make_notebooks.py``;
``python notebooks/make_notebooks.py 01_write_a_loss.ipynb`` for one).

Each stored notebook's metadata records a hash of its code cells (``alignjax.code_sha256``) at
execution; tests/test_notebooks.py checks that the stored sources are these cells, that the hash
matches (the outputs were produced by this code) and executes every notebook again. Cells assert the
facts they show, so a notebook that rots fails the test suite. Edit the cells here, then regenerate.
"""

from __future__ import annotations

import hashlib
import os
import sys

import nbclient
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))


def setup_cell(devices: int) -> str:
    return f'''# Setup: the repository root on sys.path (experiments/ is not an installed package), {devices} CPU device(s).
import os, re, sys
flags = re.sub(r"--xla_force_host_platform_device_count=\\\\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count={devices}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
root = os.getcwd()
while not os.path.isdir(os.path.join(root, "alignjax")) and os.path.dirname(root) != root:
    root = os.path.dirname(root)
sys.path.insert(0, root)
import jax
assert len(jax.devices()) == {devices}, jax.devices()
print("kernel python:", os.path.relpath(sys.prefix, root))  # relative: no machine's paths in outputs'''


NB01 = [
    ("md", "# 01 · Write a loss in ten lines\n\nA loss is a pure function of arrays: array inputs are ordinary "
           "parameters, hyperparameters keyword-only. Registering it is all the trainer needs: "
           "`losses.spec(name).required` tells the train step what to compute.\n\nHere: a *focal* DPO loss, "
           "-(1 - s(z))^gamma ls(z), which down-weights pairs the policy already separates; gamma = 0 is DPO."),
    ("code", setup_cell(1)),
    ("code", '''import jax, jax.numpy as jnp, numpy as np
import alignjax.losses as losses


@losses.register("focal_dpo", family="notebook")
def focal_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
              beta: float = 0.1, gamma: float = 2.0):
    """Focal DPO: z = beta (u_w - u_l); loss = -(1 - s(z))^gamma ls(z). gamma = 0 is DPO."""
    z = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    return -((1.0 - jax.nn.sigmoid(z)) ** gamma) * jax.nn.log_sigmoid(z)


print(losses.spec("focal_dpo").required, losses.spec("focal_dpo").hyperparameters)'''),
    ("md", "Check it against DPO at its limit (gamma = 0), values and gradients, and the log 2 point."),
    ("code", '''rng = np.random.default_rng(0)
pair = {k: jnp.asarray(rng.normal(-12, 4, 64), jnp.float32) for k in losses.spec("dpo").required}
np.testing.assert_allclose(focal_dpo(**pair, beta=0.3, gamma=0.0), losses.get("dpo")(**pair, beta=0.3), rtol=1e-6)
g = lambda fn, **h: jax.grad(lambda p: fn(**p, **h).sum())(pair)
for k, v in g(focal_dpo, beta=0.3, gamma=0.0).items():
    np.testing.assert_allclose(v, g(losses.get("dpo"), beta=0.3)[k], rtol=1e-5, atol=1e-7)
same = {k: jnp.zeros(4) for k in pair}
np.testing.assert_allclose(focal_dpo(**same, gamma=2.0), np.log(2) / 4, rtol=1e-6)  # (1/2)^2 * log 2
print("focal_dpo(gamma=0) == dpo")'''),
    ("md", "Train the quickstart model (2 layers, width 64, on 2-digit addition) with it next to DPO: a short "
           "SFT stage, then each loss for a handful of steps from the SFT model (also the frozen reference)."),
    ("code", '''import tempfile
from alignjax.repro import common

workdir = tempfile.mkdtemp(prefix="nb01_")
config = common.small_config(sft_steps=40, pref_steps=20, batch_size=32, num_eval=64, learning_rate=1e-3)
model, sft_params = common.run_sft(config, workdir)
runs, params = {}, {}
for name, loss in {"dpo": dict(name="sigmoid", beta=2.0, nll_weight=0.0),
                   "focal_dpo": dict(name="focal_dpo", beta=2.0, gamma=2.0, nll_weight=0.0)}.items():
    result = common.run_preference(config, workdir, model, sft_params, loss=loss, name=name)
    runs[name] = common.read_metrics(os.path.join(workdir, name))
    params[name] = result.params
    print(name, {k: round(result.summary[k], 4) for k in ("train/loss", "eval/ranking_accuracy")})'''),
    ("code", '''import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=60)
for name, rows in runs.items():
    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss/objective"] for r in rows], label=name)
    axes[1].plot(steps, [r["rewards/margins"] for r in rows], label=name)
axes[0].set_title("loss"); axes[1].set_title("reward margin"); axes[0].legend()
plt.show()

start = {"dpo": np.log(2), "focal_dpo": 0.25 * np.log(2)}  # policy == reference at step 1: z = 0
for name, rows in runs.items():
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 20 and all(np.isfinite(r["loss"]) for r in rows), name
    assert abs(rows[0]["loss/objective"] - start[name]) < 1e-3, name
    # Training batches are fresh each step (noisy); on average the margins end up slightly positive.
    assert np.mean([r["rewards/margins"] for r in rows[2:]]) > 0, name'''),
    ("md", "## Why the DPO loss rises over these 20 steps\n\n"
           "Not a bug in the loss or in its logging: the loss plotted at step t is the mean over that step's "
           "batch, measured *before* the step's update, on 32 pairs the policy has never trained on, so the "
           "curve is a held-out loss. After 40 SFT steps the model has not learned the addition yet, and 20 "
           "DPO steps do not teach it which answer of a new pair is right: on fresh pairs the margin "
           "z = beta (log-ratio of y_w - log-ratio of y_l) moves off 0 with a mean near 0 and a spread that "
           "grows as the policy leaves the reference. -log sigmoid(z) is convex, so a spread of z around 0 "
           "alone raises the mean loss above log 2 (Jensen: E[-log s(z)] >= -log s(E z); to second order "
           "log 2 - E[z]/2 + Var[z]/8). At lr 1e-3 with beta 2 the policy moves fast, hence the rise; the "
           "loss comes back down as the cosine schedule lowers the rate.\n\n"
           "The cell below measures this on 256 validation pairs and reruns DPO at lr 1e-4 (the quickstart's "
           "plain-DPO rate): the spread is smaller and the loss stays near log 2. Learning the task takes the "
           "quickstart's budget (2,500 SFT steps, then 300 preference steps)."),
    ("code", '''sft_rows = [r for r in common.read_metrics(os.path.join(workdir, "sft")) if "loss" in r]
print(f"SFT loss after {sft_rows[-1]['step']} steps: {sft_rows[-1]['loss']:.3f} nats a token "
      "(the quickstart's 2,500 steps reach below 0.1)")
beta = 2.0
ref = common.pair_logps(model, sft_params, config, num_pairs=256)


def margins(p):
    pol = common.pair_logps(model, p, config, num_pairs=256)
    return beta * ((pol["chosen_logps"] - ref["chosen_logps"]) - (pol["rejected_logps"] - ref["rejected_logps"]))


slow_config = common.small_config(sft_steps=40, pref_steps=20, batch_size=32, num_eval=64, learning_rate=1e-4)
slow = common.run_preference(slow_config, workdir, model, sft_params,
                             loss=dict(name="sigmoid", beta=beta, nll_weight=0.0), name="dpo_lr1e-4")
trained = {"lr 1e-3": (params["dpo"], runs["dpo"]),
           "lr 1e-4": (slow.params, common.read_metrics(os.path.join(workdir, "dpo_lr1e-4")))}
stats = {}
for label, (p, rows) in trained.items():
    z = margins(p)
    loss = float(np.mean(-jax.nn.log_sigmoid(z)))
    at_mean = float(-jax.nn.log_sigmoid(z.mean()))
    train = float(np.mean([r["loss/objective"] for r in rows if "loss" in r and r["step"] > 2]))
    stats[label] = dict(z_mean=float(z.mean()), z_std=float(z.std()), loss=loss, train=train)
    print(f"DPO {label}: validation z mean {z.mean():+.3f}, std {z.std():.3f}, z > 0 on {np.mean(z > 0):.0%}; "
          f"loss {loss:.4f} (log 2 = {np.log(2):.4f}; at the mean z {at_mean:.4f}; "
          f"log 2 - E[z]/2 + Var[z]/8 = {np.log(2) - z.mean() / 2 + z.var() / 8:.4f}); "
          f"training loss over steps 3-20: mean {train:.4f}")
    assert loss >= at_mean  # Jensen: the excess over the loss at the mean margin is the spread's
fast, slow_ = stats["lr 1e-3"], stats["lr 1e-4"]
assert fast["loss"] > np.log(2) and fast["z_std"] > 2 * abs(fast["z_mean"])  # spread, not a systematic flip
assert slow_["z_std"] < fast["z_std"] and slow_["train"] < fast["train"]'''),
]

NB02 = [
    ("md", "# 02 · Ranking accuracy after DPO\n\n\"Preference Learning Algorithms Do Not Learn Preference "
           "Rankings\" (Chen et al., arXiv 2405.19534): the ranking accuracy R = mean 1[pi(y_w) >= pi(y_l)] of a "
           "DPO policy stays far below the *idealised* accuracy R* of the optimal DPO policy, and DPO rarely "
           "flips a pair the reference ranks wrongly. Theorem 4.1 says why: pi(y_w) >= pi(y_l) iff "
           "L_DPO <= -ls(beta c), c = log pi_ref(y_l) - log pi_ref(y_w); pairs the reference misranks by a "
           "wide margin need a DPO loss far below log 2."),
    ("code", setup_cell(1)),
    ("code", '''import tempfile
import numpy as np, jax, jax.numpy as jnp
import alignjax.losses as losses
from alignjax.eval import ranking
from alignjax.repro import common

beta = 0.5
workdir = tempfile.mkdtemp(prefix="nb02_")
config = common.small_config(sft_steps=60, pref_steps=30, batch_size=64, num_eval=64, learning_rate=2e-3)
model, ref_params = common.run_sft(config, workdir)
result = common.run_preference(config, workdir, model, ref_params,
                               loss=dict(name="sigmoid", beta=beta, nll_weight=0.0))
policy = common.pair_logps(model, result.params, config, num_pairs=256)
ref = common.pair_logps(model, ref_params, config, num_pairs=256)
arrays = dict(chosen_logps=policy["chosen_logps"], rejected_logps=policy["rejected_logps"],
              ref_chosen_logps=ref["chosen_logps"], ref_rejected_logps=ref["rejected_logps"])'''),
    ("code", '''R = float(ranking.ranking_accuracy(arrays["chosen_logps"], arrays["rejected_logps"]))
R_ref = float(ranking.ranking_accuracy(arrays["ref_chosen_logps"], arrays["ref_rejected_logps"]))
R_star = {b: float(ranking.idealized_ranking_accuracy(arrays["ref_chosen_logps"], arrays["ref_rejected_logps"], beta=b))
          for b in ranking.PAPER_BETAS}
print(f"ranking accuracy: reference {R_ref:.3f} -> DPO {R:.3f}; idealised R*: " +
      ", ".join(f"beta={b:g}: {v:.3f}" for b, v in R_star.items()))
assert R == np.mean(arrays["chosen_logps"] >= arrays["rejected_logps"])
assert R <= R_star[0.1]  # the gap the paper reports'''),
    ("md", "Per-pair difficulty: the Theorem 4.1 threshold, and the identity checked pair by pair."),
    ("code", '''loss = np.asarray(losses.get("dpo")(**arrays, beta=beta))
threshold = np.asarray(ranking.dpo_ranking_threshold(arrays["ref_chosen_logps"], arrays["ref_rejected_logps"], beta=beta))
ranked = arrays["chosen_logps"] >= arrays["rejected_logps"]
margin = np.abs(loss - threshold)
clear = margin > 1e-5  # float32 ties aside, the identity is exact
assert clear.mean() > 0.9
np.testing.assert_array_equal((loss <= threshold)[clear], ranked[clear])
misranked = arrays["ref_chosen_logps"] < arrays["ref_rejected_logps"]
flipped = float(ranking.flipped_fraction(**arrays))
assert np.isclose(flipped, (misranked & ranked).sum() / misranked.sum())
print(f"{misranked.sum()} of {len(ranked)} pairs misranked by the reference; DPO flipped {flipped:.1%} of them")
print(f"median threshold: misranked pairs {np.median(threshold[misranked]):.3f}, "
      f"others {np.median(threshold[~misranked]):.3f} (log 2 = {np.log(2):.3f})")
assert np.all(threshold[misranked] < np.log(2)) and np.all(threshold[~misranked] >= np.log(2) - 1e-6)'''),
    ("code", '''import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(4.5, 3.5))
ax.scatter(threshold[ranked], loss[ranked], s=8, label="ranked correctly")
ax.scatter(threshold[~ranked], loss[~ranked], s=8, label="misranked")
lim = [0, max(threshold.max(), loss.max())]
ax.plot(lim, lim, "k--", lw=1, label="L_DPO = threshold")
ax.set_xlabel("Theorem 4.1 threshold -ls(beta c)"); ax.set_ylabel("DPO loss"); ax.legend(fontsize=8)
plt.show()'''),
]

NB03 = [
    ("md", "# 03 · Sharded log-probs on an 8-device CPU mesh\n\nThe mesh has three axes (data, fsdp, "
           "tensor); parameters and activations carry *logical* axis names that the rules map to mesh axes. "
           "The same model code runs on one device or on a mesh, and the log-probs agree."),
    ("code", setup_cell(8)),
    ("code", '''import numpy as np, jax
from alignjax import sharding, logprobs
from alignjax.models import from_pretrained

mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
print(mesh.shape)
for logical, axis in sharding.DEFAULT_RULES:
    print(f"{logical:>12} -> {axis}")
assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}'''),
    ("code", '''from alignjax.data import make_preference_batches

model1 = from_pretrained("tiny")
params = model1.params
data, _ = make_preference_batches("synthetic:arithmetic_dpo:train", "arithmetic", batch_size=8, max_length=16,
                                  buckets=(16,), seed=0, process_index=0, process_count=1)
host = next(data)
print({k: v.shape for k, v in host.items()})

model8 = from_pretrained("tiny", mesh=mesh)
shardings = model8.shardings(mesh)
sharded = jax.device_put(params, shardings)
print("lm_head sharding:", sharded["lm_head"].sharding.spec)
assert sharded["lm_head"].sharding.spec[1] == "tensor"  # the vocabulary is split over "tensor"
batch8 = sharding.global_batch(mesh, host)
print("input_ids sharding:", batch8["input_ids"].sharding.spec)'''),
    ("code", '''n = 16  # 8 pairs: 8 chosen + 8 rejected sequences
one = jax.jit(lambda p, b: logprobs.batch_sequence_logps(model1, p, b, n)[0])(
    jax.device_put(params, jax.devices()[0]), jax.device_put(host, jax.devices()[0]))
eight = jax.jit(lambda p, b: logprobs.batch_sequence_logps(model8, p, b, n)[0])(sharded, batch8)
chunked = jax.jit(lambda p, b: logprobs.batch_sequence_logps(model8, p, b, n, vocab_chunk=8)[0])(sharded, batch8)
print(np.round(np.asarray(one), 4))
np.testing.assert_allclose(np.asarray(eight), np.asarray(one), rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(np.asarray(chunked), np.asarray(one), rtol=1e-5, atol=1e-5)
assert np.all(np.asarray(one) < 0)
print("8-device mesh == one device (dense and vocabulary-chunked log-probs)")'''),
]


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    return nb


NOTEBOOKS = {"01_write_a_loss.ipynb": NB01, "02_ranking_accuracy.ipynb": NB02, "03_sharded_logprobs.ipynb": NB03}


def code_hash(sources: list[str]) -> str:
    """SHA-256 of a notebook's code cells, in order: what its stored outputs were produced by."""
    digest = hashlib.sha256()
    for src in sources:
        digest.update(src.encode() + b"\0")
    return digest.hexdigest()


def code_sources(cells: list[tuple[str, str]]) -> list[str]:
    return [src for kind, src in cells if kind == "code"]


def execute(name: str, timeout: int = 600) -> nbformat.NotebookNode:
    """Builds notebook ``name`` from its cells and runs it with nbclient (kernel ``python3``, in this
    directory); returns it with its outputs and the code hash in its metadata."""
    nb = build(NOTEBOOKS[name])
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout, record_timing=False,
                                     resources={"metadata": {"path": HERE}})
    client.execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            # Kept: what the cells print and draw. Dropped: the libraries' log lines on stderr
            # (TensorFlow/absl start-up, warnings), which depend on the machine and say nothing here.
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    nb.metadata["alignjax"] = {"code_sha256": code_hash(code_sources(NOTEBOOKS[name]))}
    return nb


def main(argv: list[str]) -> None:
    names = argv or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise SystemExit(f"error: no notebook {unknown[0]!r} in make_notebooks.NOTEBOOKS; choose from {list(NOTEBOOKS)}")
    for name in names:
        nbformat.write(execute(name), os.path.join(HERE, name))
        print("executed and wrote", os.path.join(HERE, name), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
