# The ported official lines keep their authors' layout, so line length and one-line ifs are not linted.
# ruff: noqa: E501, E701
"""GPM, MCTS-DPO and HALOs' KTO against ports (torch) of their authors' official code, on random inputs.

Each ``Official*`` / ``official_*`` below is the named file's code at the named commit, copied line for
line; only ``self`` is replaced by a stand-in (a config, a toy causal model) and the distributed
reductions by the identity (one process). Values and gradients are compared.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from alignjax import losses
from alignjax.logprobs import token_logps
from alignjax.losses import reward, step_level

# ============================================================================================= GPM
# general-preference/general-preference-model, general_preference/models/loss.py at commit b4c3195
# (identical at a376d95, the newest stored): the three losses its trainer picks
# (trainer/rm_trainer_general_preference.py: value_head_dim == 2 -> GeneralPreferenceLoss, else
# HighDimGeneralPreferenceLoss, or HighDimGeneralPreferenceMoELoss with --add_prompt_head).


class OfficialGeneralPreferenceLoss(nn.Module):
    def __init__(self, tau: float = 1):
        super().__init__()
        self.tau = tau

    def forward(self, chosen_reward, reject_reward, margin=None):
        if margin is not None:
            result = chosen_reward[:, 0] * reject_reward[:, 1] - chosen_reward[:, 1] * reject_reward[:, 0]
            loss = -F.logsigmoid((result - margin) / self.tau)
            prob = F.sigmoid((result - margin) / self.tau)
        else:
            result = chosen_reward[:, 0] * reject_reward[:, 1] - chosen_reward[:, 1] * reject_reward[:, 0]
            loss = -F.logsigmoid(result / self.tau)
            prob = F.sigmoid(result / self.tau)
        return loss.mean(), prob.mean()


class OfficialHighDimGeneralPreferenceLoss(nn.Module):
    def __init__(self, tau: float = 0.1, value_head_dim: int = 4, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tau = tau
        self.value_head_dim = value_head_dim

    def create_skew_symmetric_block_matrix(self, dim, device, dtype):
        matrix = torch.zeros((dim, dim), device=device, dtype=dtype)
        for i in range(0, dim, 2):
            matrix[i, i+1] = -1
            matrix[i+1, i] = 1
        return matrix

    def forward(self, chosen_reward, reject_reward, margin=None):
        if margin is not None:
            R_matrix = self.create_skew_symmetric_block_matrix(self.value_head_dim, chosen_reward.device, chosen_reward.dtype)
            if chosen_reward.device == reject_reward.device == R_matrix.device:
                transformed_chosen = torch.matmul(chosen_reward, R_matrix.T)
                result = torch.bmm(transformed_chosen.view(chosen_reward.shape[0], 1, self.value_head_dim), reject_reward.view(reject_reward.shape[0], self.value_head_dim, 1))
                result = result.view(chosen_reward.shape[0])
            loss = -F.logsigmoid((result - margin) / self.tau)
            prob = F.sigmoid((result - margin) / self.tau)
        else:
            R_matrix = self.create_skew_symmetric_block_matrix(self.value_head_dim, chosen_reward.device, chosen_reward.dtype)
            if chosen_reward.device == reject_reward.device == R_matrix.device:
                transformed_chosen = torch.matmul(chosen_reward, R_matrix.T)
                result = torch.bmm(transformed_chosen.view(chosen_reward.shape[0], 1, self.value_head_dim), reject_reward.view(reject_reward.shape[0], self.value_head_dim, 1))
                result = result.view(chosen_reward.shape[0])
            loss = -F.logsigmoid(result / self.tau)
            prob = F.sigmoid(result / self.tau)
        return loss.mean(), prob.mean()


class OfficialHighDimGeneralPreferenceMoELoss(nn.Module):
    def __init__(self, model, value_head_dim: int = 4, softmax_tau: float = 1.0, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model = model
        self.value_head_dim = value_head_dim
        self.softmax_tau = softmax_tau

    def forward(self, chosen_reward, reject_reward, prompt_hidden_states, margin=None):
        if margin is not None:
            R_matrix = self.model.create_skew_symmetric_block_matrix(self.value_head_dim, chosen_reward.device, chosen_reward.dtype, prompt_hidden_states)
            if chosen_reward.device == reject_reward.device == R_matrix.device:
                # Batched matrix multiplication with .view() instead of unsqueeze
                transformed_chosen = torch.bmm(chosen_reward.view(chosen_reward.shape[0], 1, self.value_head_dim), R_matrix.transpose(1, 2))
                result = torch.bmm(transformed_chosen, reject_reward.view(reject_reward.shape[0], self.value_head_dim, 1))
                result = result.view(chosen_reward.shape[0])
            loss = -F.logsigmoid((result - margin) / self.softmax_tau)
            prob = F.sigmoid((result - margin) / self.softmax_tau)
        else:
            R_matrix = self.model.create_skew_symmetric_block_matrix(self.value_head_dim, chosen_reward.device, chosen_reward.dtype, prompt_hidden_states)
            if chosen_reward.device == reject_reward.device == R_matrix.device:
                transformed_chosen = torch.bmm(chosen_reward.view(chosen_reward.shape[0], 1, self.value_head_dim), R_matrix.transpose(1, 2))
                result = torch.bmm(transformed_chosen, reject_reward.view(reject_reward.shape[0], self.value_head_dim, 1))
                result = result.view(chosen_reward.shape[0])
            loss = -F.logsigmoid(result / self.softmax_tau)
            prob = F.sigmoid(result / self.softmax_tau)
        return loss.mean(), prob.mean()


class OfficialPromptHeadModel(nn.Module):
    """The reward model's ``prompt_head`` and ``create_skew_symmetric_block_matrix`` from
    general_preference/models/rw_model_general_preference.py, at commit b4c3195 (block values =
    softmax) or 2494fac (softmax(x / sqrt(hidden_dim)) * k; that function uses ``math`` and
    ``hidden_dim`` without defining them: the hidden size is the only dimension it can mean)."""

    def __init__(self, hidden_size: int, value_head_dim: int, version: str):
        super().__init__()
        self.prompt_head = nn.Linear(hidden_size, value_head_dim // 2, bias=False)
        self.version = version

    def create_skew_symmetric_block_matrix(self, dim, device, dtype, prompt_hidden_states):
        hidden_dim = prompt_hidden_states.shape[-1]
        if hasattr(self, 'prompt_head'):
            batch_size = prompt_hidden_states.shape[0]

            # Ensure that dim is even, as we're creating blocks of size 2x2
            assert dim % 2 == 0, "dim must be even for skew-symmetric block generation"

            # Pass through the linear layer to get the block diagonal entries (half of the matrix's off-diagonal blocks)
            block_values = self.prompt_head(prompt_hidden_states).view(batch_size, dim // 2)
            if self.version == "b4c3195":
                block_values = torch.softmax(block_values, dim=-1)
            else:  # 2494fac
                block_values = torch.softmax(block_values / math.sqrt(hidden_dim), dim=-1)
                block_values = block_values * block_values.shape[-1]

            # Create a batch of zero matrices [batch_size, dim, dim]
            batch_R_matrices = torch.zeros((batch_size, dim, dim), device=device, dtype=dtype)

            # Fill only the block diagonal entries with the learned values
            for i in range(0, dim, 2):
                batch_R_matrices[:, i, i + 1] = -block_values[:, i // 2]
                batch_R_matrices[:, i + 1, i] = block_values[:, i // 2]  # Skew-symmetric condition
        else:
            raise AttributeError("prompt_head is not defined. Ensure 'add_prompt_head' is set to True during initialization.")

        return batch_R_matrices


def _gpm_inputs(seed: int, b: int, dim: int):
    r = np.random.default_rng(seed)
    vw, vl = (r.normal(0, 1, (b, dim)).astype(np.float32) for _ in range(2))
    margin = r.normal(0, 0.5, b).astype(np.float32)
    return vw, vl, margin


def _torch_grads(loss_fn, *arrays):
    """(loss value, grads) of a torch loss (a scalar mean) w.r.t. fresh leaves of ``arrays``."""
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.item(), [leaf.grad.numpy() for leaf in leaves]


@pytest.mark.parametrize("dim", [2, 4, 8])
@pytest.mark.parametrize("tau", [0.1, 1.0])
@pytest.mark.parametrize("with_margin", [False, True])
def test_gpm_matches_official(dim, tau, with_margin):
    b = 7
    vw, vl, margin = _gpm_inputs(dim, b, dim)
    m = torch.tensor(margin) if with_margin else None
    officials = [OfficialHighDimGeneralPreferenceLoss(tau, dim)]
    if dim == 2:
        officials.append(OfficialGeneralPreferenceLoss(tau))
    jm = jnp.asarray(margin) if with_margin else None

    def ours(a, c):
        return jnp.mean(reward.gpm(a, c, None, jm, tau=tau))

    got, got_grads = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(vw), jnp.asarray(vl))
    per_row = reward.gpm(vw, vl, None, jm, tau=tau)
    for official in officials:
        want, want_grads = _torch_grads(lambda a, c, f=official: f(a, c, m)[0], vw, vl)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
        rows = [official(torch.tensor(vw[i:i + 1]), torch.tensor(vl[i:i + 1]),
                         None if m is None else m[i:i + 1])[0].item() for i in range(b)]
        np.testing.assert_allclose(per_row, rows, rtol=1e-5, atol=1e-7)
    # The registry's "gpm" is this function: the test is not of a private copy.
    assert losses.get("gpm") is reward.gpm


@pytest.mark.parametrize("version", ["b4c3195", "2494fac"])
@pytest.mark.parametrize("dim", [4, 8])
@pytest.mark.parametrize("with_margin", [False, True])
def test_gpm_prompt_scales_match_official_moe(version, dim, with_margin):
    """The official prompt-dependent R (``--add_prompt_head``): its block values are alignjax's ``scales``.
    alignjax's own GPM head makes scales with a softplus instead (a different parametrisation of the
    same lambda_b(x) >= 0; the loss takes any), so the block values come from the official model here
    and the gradient w.r.t. the prompt states is chained through them."""
    b, hidden, tau = 6, 16, 0.1
    torch.manual_seed(0)
    model = OfficialPromptHeadModel(hidden, dim, version)
    official = OfficialHighDimGeneralPreferenceMoELoss(model, dim, softmax_tau=tau)
    vw, vl, margin = _gpm_inputs(10 + dim, b, dim)
    h = torch.tensor(np.random.default_rng(3).normal(0, 2, (b, hidden)).astype(np.float32), requires_grad=True)
    a, c = torch.tensor(vw, requires_grad=True), torch.tensor(vl, requires_grad=True)
    m = torch.tensor(margin) if with_margin else None
    want, _ = official(a, c, h, m)
    want.backward()

    R = model.create_skew_symmetric_block_matrix(dim, h.device, h.dtype, h)
    block_values = R[:, 1::2, 0::2].diagonal(dim1=1, dim2=2)  # R[:, 2i+1, 2i] = block value i
    scales = block_values.detach().numpy()
    jm = jnp.asarray(margin) if with_margin else None

    def ours(x, y, s):
        return jnp.mean(reward.gpm(x, y, s, jm, tau=tau))

    got, (gw, gl, gs) = jax.value_and_grad(ours, argnums=(0, 1, 2))(jnp.asarray(vw), jnp.asarray(vl),
                                                                    jnp.asarray(scales))
    np.testing.assert_allclose(got, want.item(), rtol=1e-5)
    np.testing.assert_allclose(gw, a.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gl, c.grad.numpy(), rtol=1e-4, atol=1e-7)
    (gh,) = torch.autograd.grad(block_values, h, grad_outputs=torch.tensor(np.asarray(gs)))
    np.testing.assert_allclose(gh.numpy(), h.grad.numpy(), rtol=1e-4, atol=1e-7)


# ======================================================================================== MCTS-DPO
# YuxiXie/MCTS-DPO at commit fb23437 (the newest stored): mcts_rl/utils.py (gather_log_probabilities,
# pad_tensors, calculate_preference_confidence), mcts_rl/configs/constants.py (IGNORE_INDEX), and
# mcts_rl/algorithms/mcts/trainer.py: post_tree_construct's mini-batch lines (one step's candidates
# sorted by ascending Q, init values = their visit counts) and tsrl_step's loss. The released scripts
# (scripts/mcts_*.sh) run it with --conservative --choose_worst --scale_coeff 0.1 and no --norm_prob
# or --ipo.
IGNORE_INDEX: int = -100


def gather_log_probabilities(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Gather log probabilities of the given labels from the logits."""
    log_probs = F.log_softmax(logits, dim=-1)
    log_probs_labels = log_probs.gather(dim=-1, index=labels.unsqueeze(dim=-1))
    return log_probs_labels.squeeze(dim=-1)


def pad_tensors(tensors, max_len=-1, pad_value=IGNORE_INDEX):
    tensors = [x for x in tensors]
    if max_len <= 0:
        max_len = max([len(x) for x in tensors])
    for i in range(len(tensors)):
        pad_len = max_len - len(tensors[i])
        tmp = torch.ones((pad_len,), dtype=torch.long, device=tensors[i].device)
        tensors[i] = torch.cat((tensors[i], tmp * pad_value), dim=-1).long()
    return torch.stack(tensors, dim=0)


def calculate_preference_confidence(qb, qw):
    return 1 / (1 + qw / max(1, qb))


def official_mini_batches(prompts, candidates, init_value_list, pad_token_id):
    """post_tree_construct: one mini-batch per step (prompt repeated, candidates padded)."""
    mini_batches = {k: [] for k in ['prompts_list', 'input_ids_list', 'attention_mask_list', 'init_value_list']}
    for prompt, next_completions, init_values in zip(prompts, candidates, init_value_list):
        prompt = torch.stack([prompt for _ in next_completions], dim=0)
        attention_mask = pad_sequence([
            torch.ones((prompt.size(-1) + x.size(-1),), dtype=torch.bool, device=prompt.device)
            for x in next_completions
        ], batch_first=True, padding_value=False)
        next_completions = pad_sequence(next_completions, batch_first=True, padding_value=pad_token_id)
        input_ids = torch.cat((prompt, next_completions), dim=-1)
        mini_batches['prompts_list'].append(prompt)
        mini_batches['input_ids_list'].append(input_ids)
        mini_batches['attention_mask_list'].append(attention_mask)
        mini_batches['init_value_list'].append(init_values)
    return mini_batches


def official_tsrl_loss(self, prompts_list, input_ids_list, attention_mask_list, init_value_list,
                       max_n_sample=8):
    """tsrl_step up to ``loss = torch.stack(losses).mean()`` (the backward/metrics after it are omitted)."""

    def compute_log_probs(model, input_ids, attention_mask):
        """Compute log probabilities of given sequences."""
        logits = model(input_ids, attention_mask=attention_mask).logits
        return gather_log_probabilities(logits[:, :-1], input_ids[:, 1:])

    losses, better_sample_rewards, worse_sample_rewards, max_lengths = [], [], [], []
    n_sample = len(input_ids_list)
    start = prompts_list[0].size(-1) - 1
    better_idx = -1
    worse_idx = 0 if self.args.choose_worst else -2

    all_better_input_ids, all_worse_input_ids = [], []
    all_better_attention_mask, all_worse_attention_mask = [], []
    all_init_value_list = []
    for sample_id in range(n_sample):
        if len(all_better_input_ids) >= max_n_sample: break

        input_ids = input_ids_list[sample_id]
        attention_mask = attention_mask_list[sample_id]

        n_output = input_ids.size(0)
        if n_output < 2: continue

        if self.args.choose_random:
            worse_idx = random.choice(range(n_output - 1))  # noqa: F821 (never taken: choose_random=False here)

        all_better_input_ids.append(input_ids[better_idx])
        all_worse_input_ids.append(input_ids[worse_idx])
        all_better_attention_mask.append(attention_mask[better_idx])
        all_worse_attention_mask.append(attention_mask[worse_idx])
        all_init_value_list.extend([init_value_list[sample_id][better_idx], init_value_list[sample_id][worse_idx]])
    all_input_ids = pad_tensors(all_better_input_ids + all_worse_input_ids, pad_value=self.tokenizer.pad_token_id)
    all_attention_mask = pad_tensors(all_better_attention_mask + all_worse_attention_mask, pad_value=False)

    all_sequence_log_probs = compute_log_probs(
        self.actor_model.module,
        input_ids=all_input_ids,
        attention_mask=all_attention_mask,
    )
    all_better_input_ids, all_worse_input_ids = all_input_ids.chunk(chunks=2, dim=0)
    all_better_attention_mask, all_worse_attention_mask = all_attention_mask.chunk(chunks=2, dim=0)
    all_better_sequence_log_probs, all_worse_sequence_log_probs = all_sequence_log_probs.chunk(chunks=2, dim=0)

    label_smoothing_values = []
    for sample_id in range(len(all_better_input_ids)):
        better_input_ids = all_better_input_ids[sample_id]
        better_attention_mask = all_better_attention_mask[sample_id]

        worse_input_ids = all_worse_input_ids[sample_id]
        worse_attention_mask = all_worse_attention_mask[sample_id]

        init_values = [all_init_value_list[sample_id * 2], all_init_value_list[sample_id * 2 + 1]]
        better_sequence_log_probs, worse_sequence_log_probs = all_better_sequence_log_probs[sample_id], all_worse_sequence_log_probs[sample_id]

        with torch.no_grad():
            ref_better_sequence_log_probs = compute_log_probs(
                self.actor_reference_model.module,
                input_ids=better_input_ids.unsqueeze(0),
                attention_mask=better_attention_mask.unsqueeze(0),
            )[0]
            ref_worse_sequence_log_probs = compute_log_probs(
                self.actor_reference_model.module,
                input_ids=worse_input_ids.unsqueeze(0),
                attention_mask=worse_attention_mask.unsqueeze(0),
            )[0]

        better_end_index = better_attention_mask.nonzero()[-1]
        worse_end_index = worse_attention_mask.nonzero()[-1]
        try:
            diverge_index = (better_input_ids != worse_input_ids).nonzero()[0]
            assert 0 <= diverge_index <= better_end_index, 'diverge index is out of range!'
            assert 0 <= diverge_index <= worse_end_index, 'diverge index is out of range!'
        except:  # noqa: E722
            continue

        better_seq_slice = slice(diverge_index - 1, better_end_index)
        worse_seq_slice = slice(diverge_index - 1, worse_end_index)

        better_log_probs = better_sequence_log_probs[better_seq_slice].sum(dim=-1)
        worse_log_probs = worse_sequence_log_probs[worse_seq_slice].sum(dim=-1)
        ref_better_log_probs = ref_better_sequence_log_probs[better_seq_slice].sum(dim=-1)
        ref_worse_log_probs = ref_worse_sequence_log_probs[worse_seq_slice].sum(dim=-1)
        better_log_ratio = better_log_probs - ref_better_log_probs
        worse_log_ratio = worse_log_probs - ref_worse_log_probs
        if self.args.norm_prob or self.args.ipo:
            better_log_ratio /= better_attention_mask[better_seq_slice].sum(dim=-1) ** self.args.length_penalty
            worse_log_ratio /= worse_attention_mask[worse_seq_slice].sum(dim=-1) ** self.args.length_penalty
        logits = better_log_ratio - worse_log_ratio

        if self.args.ipo:
            losses.append((logits - 1 / (2 * self.scale_coeff)) ** 2)
        elif self.args.conservative:
            qb, qw = init_values
            confidence = calculate_preference_confidence(qb, qw)
            label_smoothing = min(1 - confidence, 0.5)
            losses.append(
                - F.logsigmoid(self.scale_coeff * logits) * (1 - label_smoothing)
                - F.logsigmoid(-self.scale_coeff * logits) * label_smoothing
            )
            label_smoothing_values.append(label_smoothing)
        else:
            losses.append(-F.logsigmoid(self.scale_coeff * logits))
        better_sample_rewards.append(self.scale_coeff * better_log_ratio.detach())
        worse_sample_rewards.append(self.scale_coeff * worse_log_ratio.detach())

        max_lengths.append(better_attention_mask[start:].float().sum())
        max_lengths.append(worse_attention_mask[start:].float().sum())

    loss = torch.stack(losses).mean()
    return loss, label_smoothing_values


V_TOY = 11
PAD = 0


class ToyCausalLM(nn.Module):
    """A causal stand-in for the actor: logits_t = A[x_t] + C[x_{t-1}] (x_{-1} = PAD), so two sequences
    with the same prefix get the same log-probs on it, as a transformer's would."""

    def __init__(self, a: np.ndarray, c: np.ndarray):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, input_ids, attention_mask=None):
        prev = torch.cat([torch.full_like(input_ids[:, :1], PAD), input_ids[:, :-1]], dim=1)
        return types.SimpleNamespace(logits=self.a[input_ids] + self.c[prev])


def _toy_logits_jax(a, c, ids):
    prev = jnp.concatenate([jnp.full_like(ids[:, :1], PAD), ids[:, :-1]], axis=1)
    return a[ids] + c[prev]


def _padded_steps(prompts, steps):
    """alignjax side: prompt + whole step per row, right-padded, and the mask of the step's next-token
    targets (alignjax's step pairs put the full child step in chosen/rejected, shared leading tokens
    included)."""
    rows = [np.concatenate([p, st]) for p, st in zip(prompts, steps)]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), PAD, np.int64)
    mask = np.zeros((len(rows), width - 1), np.float32)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        ids[i, :len(row)] = row
        mask[i, len(p) - 1:len(row) - 1] = 1.0
    return jnp.asarray(ids), jnp.asarray(mask)


def _step_logps(a, c, ids, mask):
    """[P] summed log-probs of the masked targets, through alignjax's token log-probs."""
    return jnp.sum(token_logps(_toy_logits_jax(a, c, ids)[:, :-1], ids[:, 1:]) * mask, axis=-1)


def _mcts_case(seed: int):
    """Steps of a tree: each has a prompt and 2-3 candidate child steps in ascending Q order, some
    sharing leading tokens, with visit counts covering N_w = 0, N_l = 0 and N_l > N_w (eps capped)."""
    r = np.random.default_rng(seed)
    visits = [[3, 0], [5, 2, 7], [0, 1, 4], [2, 9], [4, 6, 1]]  # ascending-Q order: last = best
    prompts, candidates = [], []
    for k, vs in enumerate(visits):
        prompts.append(torch.tensor(r.integers(1, V_TOY, 3 + k)))
        shared = r.integers(1, V_TOY, k % 3)  # a leading piece common to all of this step's children
        steps = []
        for _ in vs:
            tail = r.integers(1, V_TOY, r.integers(2, 6))
            steps.append(torch.tensor(np.concatenate([shared, tail]).astype(np.int64)))
        for j in range(1, len(steps)):  # children must differ after the shared piece
            if steps[j][len(shared)] == steps[0][len(shared)]:
                steps[j][len(shared)] = steps[0][len(shared)] % (V_TOY - 1) + 1
        candidates.append(steps)
    params = [r.normal(0, 1, (V_TOY, V_TOY)).astype(np.float32) for _ in range(4)]
    return prompts, candidates, visits, params


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("conservative", [True, False])
def test_mcts_dpo_matches_official(beta, conservative):
    """Official from-the-divergence sums vs alignjax's whole-step sums: a shared leading piece adds the
    same log-ratio to both sides and cancels in the margin, so values and gradients agree."""
    prompts, candidates, visits, (a, c, ra, rc) = _mcts_case(0)
    actor, ref = ToyCausalLM(a, c), ToyCausalLM(ra, rc)
    args = types.SimpleNamespace(choose_worst=True, choose_random=False, norm_prob=False, ipo=False,
                                 length_penalty=1.0, conservative=conservative)
    trainer = types.SimpleNamespace(args=args, scale_coeff=beta, tokenizer=types.SimpleNamespace(pad_token_id=PAD),
                                    actor_model=types.SimpleNamespace(module=actor),
                                    actor_reference_model=types.SimpleNamespace(module=ref))
    mb = official_mini_batches(prompts, candidates, visits, PAD)
    want, eps_official = official_tsrl_loss(trainer, mb['prompts_list'], mb['input_ids_list'],
                                            mb['attention_mask_list'], mb['init_value_list'])
    want.backward()

    ps = [p.numpy() for p in prompts]
    chosen = _padded_steps(ps, [st[-1].numpy() for st in candidates])  # highest Q
    rejected = _padded_steps(ps, [st[0].numpy() for st in candidates])  # lowest Q (--choose_worst)
    nw, nl = np.array([v[-1] for v in visits]), np.array([v[0] for v in visits])
    ref_w, ref_l = _step_logps(ra, rc, *chosen), _step_logps(ra, rc, *rejected)

    def ours(pa, pc):
        pw, pl = _step_logps(pa, pc, *chosen), _step_logps(pa, pc, *rejected)
        if conservative:
            return jnp.mean(losses.get("mcts_dpo")(pw, pl, ref_w, ref_l, nw, nl, beta=beta))
        return jnp.mean(losses.get("dpo")(pw, pl, ref_w, ref_l, beta=beta))

    got, (ga, gc) = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(c))
    np.testing.assert_allclose(got, want.item(), rtol=1e-5)
    np.testing.assert_allclose(ga, actor.a.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gc, actor.c.grad.numpy(), rtol=1e-4, atol=1e-6)
    if conservative:
        np.testing.assert_allclose(step_level.visit_label_smoothing(nw, nl), eps_official, rtol=1e-6)
        assert 0.0 in eps_official and 0.5 in eps_official  # N_l = 0 and the cap are both exercised
    # The shared pieces really are there (else the cancellation above would not be tested).
    assert any(bool((s[0][:1] == s[-1][:1]).all()) for s in candidates)


# ========================================================================================= HALOs KTO
# ContextualAI/HALOs at commit 4831988 (the newest stored), train/trainers.py:
# BasicTrainer.get_sequence_rewards (humanline off) and KTOTrainer.loss; accelerator.reduce is the
# identity on one process.


class HalosKTO:
    def __init__(self, beta, desirable_weight, undesirable_weight):
        self.config = types.SimpleNamespace(
            humanline=False, loss=types.SimpleNamespace(
                beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight))
        self.policy_dtype = torch.float32
        self.accelerator = types.SimpleNamespace(device="cpu", reduce=lambda t, reduction: t)

    def get_sequence_rewards(self, policy_logps, reference_logps, length_normalized=False):
        if self.config.humanline:
            raise NotImplementedError  # not ported: alignjax has no humanline clamp
        else:
            token_rewards = policy_logps - reference_logps
            unclamped = torch.Tensor([1]).to(self.policy_dtype).to(self.accelerator.device)

        normalization_factor = (token_rewards.abs() != 0).float().sum(-1) if length_normalized else 1
        sequence_rewards = token_rewards.sum(-1) / normalization_factor

        return sequence_rewards, unclamped

    def loss(self, batch, policy_chosen_logps, policy_rejected_logps, policy_KL_logps,
             reference_chosen_logps, reference_rejected_logps, reference_KL_logps, *args):
        if policy_chosen_logps.shape[0] != 0:
            chosen_rewards, chosen_unclamped = self.get_sequence_rewards(policy_chosen_logps, reference_chosen_logps)
        else:
            chosen_rewards = torch.Tensor([]).to(self.policy_dtype).to(self.accelerator.device)
            chosen_unclamped = torch.Tensor([1]).to(self.policy_dtype).to(self.accelerator.device)

        if policy_rejected_logps.shape[0] != 0:
            rejected_rewards, rejected_unclamped = self.get_sequence_rewards(policy_rejected_logps, reference_rejected_logps)
        else:
            rejected_rewards = torch.Tensor([]).to(self.policy_dtype).to(self.accelerator.device)
            rejected_unclamped = torch.Tensor([1]).to(self.policy_dtype).to(self.accelerator.device)

        KL_rewards, _ = self.get_sequence_rewards(policy_KL_logps.detach(), reference_KL_logps.detach())

        stats = self.accelerator.reduce(torch.Tensor([
            (chosen_rewards.abs() != 0).float().sum().item(),   # non-empty sequences after rejection sampling
            len(chosen_rewards),
            (rejected_rewards.abs() != 0).float().sum().item(), # non-empty sequences after rejection sampling
            len(rejected_rewards),
            KL_rewards.sum(),                                   # sum of non-empty KL examples
            (KL_rewards.abs() != 0).float().sum().item(),       # number of non-empty KL examples
        ]).to(self.accelerator.device), reduction="sum")

        KL = (stats[4] / stats[5].clamp(min=1)).clamp(min=0)

        if policy_chosen_logps.shape[0] != 0:
            chosen_losses = self.config.loss.desirable_weight * (1 - F.sigmoid(self.config.loss.beta * (chosen_rewards - KL)))
        else:
            # important to cast to policy_dtype; otherwise error will occur during all_gather
            chosen_losses = torch.Tensor([]).to(self.policy_dtype).to(self.accelerator.device)

        if policy_rejected_logps.shape[0] != 0:
            rejected_losses = self.config.loss.undesirable_weight * (1 - F.sigmoid(self.config.loss.beta * (KL - rejected_rewards)))
        else:
            # important to cast to policy_dtype; otherwise error will occur during all_gather
            rejected_losses = torch.Tensor([]).to(self.policy_dtype).to(self.accelerator.device)

        losses = torch.cat((chosen_losses, rejected_losses), 0)

        return losses, chosen_rewards.detach(), rejected_rewards.detach(), KL.detach(), chosen_unclamped, rejected_unclamped


T_KTO = 7


def _token_rows(r, n, shift=0.0, empty=()):
    """[n, T] token log-probs as HALOs' get_batch_logps returns them (zero where not scored)."""
    lp = -r.uniform(0.1, 3.0, (n, T_KTO)).astype(np.float32) + shift / T_KTO
    start = r.integers(1, T_KTO - 2, n)
    mask = np.arange(T_KTO)[None] >= start[:, None]
    mask[list(empty)] = False
    return (lp * mask).astype(np.float32), mask


def _ref_rows(r, mask):
    """Reference token log-probs on the same scored tokens."""
    return (-r.uniform(0.1, 3.0, mask.shape) * mask).astype(np.float32)


@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
@pytest.mark.parametrize("kl_shift", [3.0, -3.0])  # z0 > 0, and a negative KL mean clamped to 0
@pytest.mark.parametrize("n_chosen", [5, 0])
def test_kto_matches_halos(beta, wd, wu, kl_shift, n_chosen):
    r = np.random.default_rng(int(10 * beta) + n_chosen)
    n_rejected, n_kl = 3, 8
    pc, mc = _token_rows(r, n_chosen, shift=2.0)
    pr, mr = _token_rows(r, n_rejected, shift=-1.0)
    rc, rr = _ref_rows(r, mc), _ref_rows(r, mr)
    kl, kl_mask = _token_rows(r, n_kl, shift=kl_shift)
    ref_kl = _ref_rows(r, kl_mask)
    halos = HalosKTO(beta, wd, wu)
    t_pc, t_pr = torch.tensor(pc, requires_grad=True), torch.tensor(pr, requires_grad=True)
    # get_batch_logps returns per_token_logps * loss_mask: the gradient reaches scored tokens only.
    want, _, _, want_kl, _, _ = halos.loss({}, t_pc * torch.tensor(mc), t_pr * torch.tensor(mr), torch.tensor(kl),
                                           torch.tensor(rc), torch.tensor(rr), torch.tensor(ref_kl))
    want.mean().backward()
    assert (want_kl.item() > 0) == (kl_shift > 0)

    ref = jnp.concatenate([rc.sum(-1), rr.sum(-1)])
    labels = np.array([True] * n_chosen + [False] * n_rejected)

    def ours(logps):
        return losses.get("kto")(logps, ref, labels, kl.sum(-1), ref_kl.sum(-1), beta=beta,
                                 desirable_weight=wd, undesirable_weight=wu)

    logps = jnp.concatenate([pc.sum(-1), pr.sum(-1)])
    per_example = ours(logps)
    np.testing.assert_allclose(per_example, want.detach().numpy(), rtol=1e-5, atol=1e-7)
    grad = jax.grad(lambda x: jnp.mean(ours(x)))(logps)
    # HALOs differentiates each scored token's log-prob; each gets its sequence's gradient.
    want_grad = np.concatenate([np.zeros_like(pc) if t_pc.grad is None else t_pc.grad.numpy(), t_pr.grad.numpy()])
    mask = np.concatenate([mc, mr])
    np.testing.assert_allclose(np.where(mask, grad[:, None], 0.0), want_grad, rtol=1e-4, atol=1e-8)


def test_kto_halos_skips_empty_kl_rows():
    """A deliberate difference at the edge: HALOs' reference point averages only the non-empty KL rows
    (log-ratio exactly 0 = every token rejected), alignjax averages the K rows it is given, which its
    step forms from real mismatched completions. Given the non-empty rows, the two agree."""
    r = np.random.default_rng(7)
    pc, _ = _token_rows(r, 4, shift=2.0)
    pr, _ = _token_rows(r, 4)
    kl, kl_mask = _token_rows(r, 6, shift=3.0, empty=(1, 4))
    ref_kl = _ref_rows(r, kl_mask)
    rc, rr = np.zeros_like(pc), np.zeros_like(pr)
    want, *_ = HalosKTO(0.1, 1.0, 1.0).loss({}, torch.tensor(pc), torch.tensor(pr), torch.tensor(kl),
                                            torch.tensor(rc), torch.tensor(rr), torch.tensor(ref_kl))
    keep = kl_mask.any(-1)
    assert not keep.all()
    args = (jnp.concatenate([pc.sum(-1), pr.sum(-1)]), jnp.zeros(8), np.arange(8) < 4)
    got = losses.get("kto")(*args, kl.sum(-1)[keep], ref_kl.sum(-1)[keep], beta=0.1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)
    with_empty = losses.get("kto")(*args, kl.sum(-1), ref_kl.sum(-1), beta=0.1)
    assert not np.allclose(with_empty, want.numpy(), rtol=1e-5, atol=1e-7)
