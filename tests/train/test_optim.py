"""The optimiser against Hugging Face's Trainer and torch: decay mask, AdamW, clipping, schedules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from alignjax.models.config import ModelConfig
from alignjax.models.hf import tensor_maps
from alignjax.models.model import Model
from alignjax.train import optim

transformers = pytest.importorskip("transformers")


def _optim(**changes):
    base = dict(
        name="adamw", learning_rate=1e-2, schedule="cosine", warmup_steps=3, end_learning_rate_factor=0.0,
        weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.5, grad_accum_steps=1,
    )  # fmt: skip
    return ml_collections.ConfigDict({**base, **changes})


HF_CONFIGS = {
    "llama (attention_bias)": transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False,
    ),
    "qwen3 (q/k norms)": transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_decay_mask_is_trainers_decay_parameter_names(name):
    hf_config = HF_CONFIGS[name]
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    # The method reads nothing from the Trainer instance.
    hf_decay = set(transformers.Trainer.get_decay_parameter_names(None, hf_model))
    config = ModelConfig.from_hf(hf_config.to_dict())
    params = jax.eval_shape(Model(config).init, jax.random.PRNGKey(0))
    mask = optim.decay_mask(params)
    maps = tensor_maps(config)
    hf_names = {n for n, _ in hf_model.named_parameters()}
    assert {m.hf_name for m in maps} <= hf_names
    got = {m.hf_name for m in maps if _get(mask, m.param_path)}
    assert got == {m.hf_name for m in maps} & hf_decay
    assert "model.embed_tokens.weight" in got and "lm_head.weight" in got  # HF decays embeddings
    assert not any("norm" in n or n.endswith("bias") for n in got)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_adamw_and_clipping_match_torch():
    """Five steps of optax (this module) vs torch.optim.AdamW + clip_grad_norm_ on the same gradients:
    two decayed matrices, one bias (no decay), clipping active on every step."""
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 3), "v": (3,), "bias": (3,)}
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) * 2 for k, s in shapes.items()} for _ in range(5)]
    cfg = _optim(schedule="linear", warmup_steps=2)
    tx, schedule = optim.make_optimizer(cfg, 5)
    params = {"mlp": {"w": jnp.asarray(init["w"])}, "proj": {"kernel": jnp.asarray(init["v"]),
              "bias": jnp.asarray(init["bias"])}}  # fmt: skip
    state = tx.init(params)
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    decay = [tp["w"], tp["v"]]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": [tp["bias"]], "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
    )  # fmt: skip
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=5)
    for step, g in enumerate(grads):
        jg = {"mlp": {"w": jnp.asarray(g["w"])}, "proj": {"kernel": jnp.asarray(g["v"]),
              "bias": jnp.asarray(g["bias"])}}  # fmt: skip
        assert float(schedule(step)) == pytest.approx(sched.get_last_lr()[0], rel=1e-6, abs=1e-12)
        updates, state = tx.update(jg, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        norm = torch.nn.utils.clip_grad_norm_(list(tp.values()), cfg.grad_clip_norm)
        assert float(norm) > cfg.grad_clip_norm  # clipping is active
        opt.step()
        sched.step()
    got = {"w": params["mlp"]["w"], "v": params["proj"]["kernel"], "bias": params["proj"]["bias"]}
    for k in tp:
        np.testing.assert_allclose(np.asarray(got[k]), tp[k].detach().numpy(), rtol=2e-6, atol=2e-7)
    # the bias moved by Adam only: with decay it would differ by ~lr * wd * |p|, far above tolerance
    assert not np.allclose(np.asarray(got["bias"]), init["bias"])


@pytest.mark.parametrize(
    "kind,warmup,end",
    [("linear", 3, 0.0), ("cosine", 3, 0.0), ("cosine", 0, 0.0), ("cosine", 4, 0.1), ("constant", 2, 0.0)],
)
def test_schedule_is_hf_get_scheduler(kind, warmup, end):
    """lr of the step after s updates == HF's scheduler lr before its (s+1)-th step()."""
    steps = 12
    cfg = _optim(schedule=kind, warmup_steps=warmup, end_learning_rate_factor=end)
    schedule = optim.make_schedule(cfg, steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    hf_kind = {"constant": "constant_with_warmup"}.get(kind, kind)
    kwargs = {}
    if end:
        hf_kind, kwargs = "cosine_with_min_lr", {"scheduler_specific_kwargs": {"min_lr_rate": end}}
    sched = transformers.get_scheduler(
        hf_kind, opt, num_warmup_steps=warmup, num_training_steps=steps, **kwargs
    )
    for s in range(steps):
        assert float(schedule(s)) == pytest.approx(sched.get_last_lr()[0], rel=1e-5, abs=1e-12), s
        opt.step()
        sched.step()
