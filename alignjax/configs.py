"""The config layer every experiment file builds on: :func:`base_config` (every key the jobs read),
big_vision-style typed string arguments (:func:`parse_arg`), shared pieces (:func:`runlocal`,
:func:`arithmetic_data`, ...) and :func:`load_config_file`.

An experiment file is any ``<name>.py`` with ``get_config(arg=None)`` that imports this module
(``from alignjax import configs``), in the repository's ``experiments/`` or anywhere on disk; ``arg``
is the text after the colon in ``--config=experiments/dpo.py:model=tiny,loss=ipo,runlocal``.
:func:`parse_arg` turns it into a ConfigDict of typed values (defaults give the types; a bare name is
a boolean flag).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


def check_config_file(argv: Sequence[str]) -> None:
    """Fails on a --config file that does not exist, naming it (config_flags' own message is a
    multi-line traceback)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is not None and not os.path.isfile(spec.partition(":")[0]):
        raise FileNotFoundError(f"--config={spec}: no such config file {spec.partition(':')[0]!r}")


def load_module(path: str) -> ModuleType:
    """The config file at ``path`` as a module, imported by path as config_flags does: its directory
    need not be on ``sys.path``."""
    name = "_alignjax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def sibling(config_file: str, name: str) -> ModuleType:
    """The config file ``<name>.py`` in the directory of ``config_file`` (pass ``__file__``): how one
    experiment builds on another wherever the directory lies (``grpo = configs.sibling(__file__,
    "grpo")``)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{config_file} builds on {path}, which does not exist")
    return load_module(path)


def load_config_file(spec: str) -> ConfigDict:
    """``path.py[:arg]`` -> ``get_config(arg)``, the file imported by path (:func:`load_module`)."""
    path, _, arg = spec.partition(":")
    check_config_file([f"--config={spec}"])
    module = load_module(path)
    return module.get_config(arg) if arg else module.get_config()


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parses ``"a=1,b=x,flag"`` against ``defaults`` (which fix each value's type).

    Unknown names raise a ValueError listing the valid ones; ``flag`` alone means ``flag=True``.
    """
    out = ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"unknown config argument {key!r} in {arg!r}; valid arguments: {sorted(defaults)}"
            )
        default = defaults[key]
        if not _:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} must be true or false")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out


# The training stages a staged job runs (alignjax.train.pipeline.stage_config), and the shared
# sections a stage may override: config.<stage>.<section>.<key> replaces config.<section>.<key>.
STAGES = ("sft", "dpo")
STAGE_SECTIONS = ("model", "data", "loss", "reference", "optim", "train")


def stage_section() -> ConfigDict:
    """An empty stage section: one empty override section per :data:`STAGE_SECTIONS` entry. Its keys
    are keys of the shared sections (``config.sft.optim.learning_rate`` overrides
    ``config.optim.learning_rate``; in ``loss`` also a hyperparameter of the stage's loss), checked by
    :func:`alignjax.train.pipeline.stage_config`."""
    return ConfigDict({section: ConfigDict() for section in STAGE_SECTIONS})


def base_config() -> ConfigDict:
    """Every key the jobs read, with defaults, the job sections included. Experiment files change
    values, never add keys: a key added here is valid everywhere, and ``--config.key=value`` naming
    no key fails before any compute. The stage sections (:data:`STAGES`) are the one place keys are
    set that this function does not list: they override keys it does list (:func:`stage_section`)."""
    c = ConfigDict()
    # The job alignjax.main runs (alignjax.jobs.JOBS): train | score | quickstart | reward_model |
    # mcts_dpo | grpo | rloo | online_dpo | ppo | source_logps | semantic_distance | prompt_classifier;
    # the reproductions' repro_* jobs take configs of their own.
    c.job = "train"
    c.seed = 0
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = ()  # ((logical_name, mesh_axis), ...) overriding alignjax.sharding.DEFAULT_RULES
    c.distributed = ConfigDict(dict(enabled=False, coordinator_address="", num_processes=0, process_id=0))

    # path: a preset name or an HF checkpoint directory. dtype: the param (master-weight) dtype;
    # compute_dtype: activations and matmuls ("" = dtype; float32 + bfloat16 is mixed precision);
    # remat: none | full | dots | dots_no_batch ("" = none), per decoder layer. attention_kernel:
    # auto | xla | splash ("" = auto: cuDNN flash attention on GPUs, Pallas splash on TPUs).
    # scan_layers: true = the decoder layers as one nn.scan (compile time flat in depth), false =
    # unrolled; unset = the preset's choice (scanned for the real checkpoints' shapes, unrolled for
    # tiny/bench-7m) and unrolled for an HF directory. A run resumes only in the layout it saved.
    c.model = ConfigDict(dict(path="tiny", dtype="float32", compute_dtype="", remat="", attention_kernel=""))
    c.model.scan_layers = ml_collections.config_dict.placeholder(bool)
    # ModelConfig fields replacing the preset's (presets only), e.g. vocab_size, hidden_size; vocab_size
    # 0 = the tokenizer's vocabulary when that is larger than the preset's.
    c.model.overrides = ConfigDict(
        dict(
            vocab_size=0,
            hidden_size=0,
            num_layers=0,
            num_heads=0,
            num_kv_heads=0,
            head_dim=0,
            intermediate_size=0,
        )
    )
    # LoRA / QLoRA (alignjax/models/lora.py): rank 0 = full fine-tuning. targets: comma-separated
    # fnmatch patterns of projection names (q_proj, ..., down_proj) or "all-linear"; quantize: the
    # frozen base as none | int8 | nf4 (QLoRA). With LoRA the frozen reference is the base itself.
    # dropout: PEFT's lora_dropout on the adapters' input in the preference step's training forward
    # (keys from the train state's rng; other jobs refuse it).
    c.model.lora = ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets="all-linear", quantize="none"))

    c.data = ConfigDict()
    # synthetic:<task>:<split> (alignjax.data.synthetic), a JSONL/Parquet path, hf:<dataset dir or
    # name>[:split] (Hugging Face datasets), tfds:NAME or seqio:NAME. Experiments on the built-in
    # arithmetic task set it with arithmetic_data().
    c.data.source = ""
    # Evaluation data: a source as above; "" = a held-out data.eval_fraction of data.source (0 = no
    # evaluation). A synthetic: eval set is used only when data.source is synthetic too.
    c.data.eval_source = ""
    c.data.eval_fraction = 0.0
    c.data.tokenizer = "arithmetic"  # a built-in name or a directory with tokenizer.json
    c.data.kind = "pairwise"  # pairwise | sft | unpaired
    c.data.on_bad_row = "error"  # error | skip (skips are counted in summary.json)
    # Tokenized cache of a JSONL/Parquet source (alignjax/data/cache.py): a directory, local or gs://,
    # that runs may share; "" = <workdir>/data_cache, "off" = tokenize in memory every start.
    c.data.cache_dir = ""
    c.data.layout = "padded"  # padded | packed | shared_prompt
    # Prompt/completion boundary: trl (TRL 1.16's DPOTrainer, token for token) | joint (docs/interop.md).
    c.data.tokenization = "trl"
    # Truncation as TRL: each prompt+completion cut to max_length (TRL's DPOConfig default 1024)
    # keeping its start (keep_start) or end (keep_end); max_prompt_length keeps the prompt's last
    # tokens, max_completion_length each completion's first (0 = no cut).
    c.data.max_length = 1024
    c.data.max_prompt_length = 0
    c.data.max_completion_length = 0
    c.data.truncation_mode = "keep_start"
    c.data.pad_to_multiple_of = 0  # > 0: row length rounded up to a multiple (128 suits TPU kernels)
    # Losses reading rationale_logps (rationale_dpo): the text between the prompt and each record's
    # 'rationale', filled with {chosen} and {rejected}; "" = alignjax.data.tokenize.RATIONALE_TEMPLATE.
    c.data.rationale_template = ""
    c.data.batch_size = 16  # global examples (pairs) per optimizer step
    c.data.eval_batch_size = 64
    c.data.num_eval = 256  # held-out examples for periodic evaluation

    # name: a loss of alignjax.losses.names(), or several joined by "+" with weights (one per loss,
    # () = all 1.0): TRL's loss_type=[...] and loss_weights, e.g. MPO "sigmoid+bco_pair+sft" (0.8, 0.2,
    # 1.0). Then the losses' keyword-only hyperparameters (filled by fill_loss_hyperparameters; a key
    # goes to every mixed loss that takes it). nll_weight: the loss's own where it has one (cpo, rpo,
    # spar), else the trainer's + nll_weight * mean token NLL of the chosen completions; unset = the
    # loss's default and no added term. module: a dotted module name or .py path imported before the
    # registry is read, so that a loss it registers can be named here.
    c.loss = ConfigDict(dict(name="sigmoid", weights=(), module=""))
    c.loss.nll_weight = ml_collections.config_dict.placeholder(float)

    c.reference = ConfigDict()
    c.reference.kind = "frozen"  # frozen | none | cache | ema
    c.reference.path = ""  # the frozen reference's HF dir ("" = a copy of the policy init); score.py: its own
    c.reference.cache_dir = ""  # kind=cache: where the precomputed log-probs live ("" = <workdir>/ref_cache)
    c.reference.sync_every = 0  # kind=ema: tau, steps between synchronisations (TR-DPO)
    c.reference.alpha = 1.0  # kind=ema: ref <- alpha * policy + (1 - alpha) * ref (1.0 = hard sync)

    c.optim = ConfigDict()
    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "cosine"  # cosine | linear | constant (after linear warmup)
    c.optim.warmup_steps = 0
    c.optim.end_learning_rate_factor = 0.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 1.0  # 0 = no clipping
    c.optim.grad_accum_steps = 1  # micro-batches per optimizer step (scanned; equals the full-batch gradient)

    c.train = ConfigDict()
    c.train.num_steps = 100
    c.train.log_every = 1
    c.train.eval_every = 0  # 0 = only at the end
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 2
    c.train.async_checkpoints = True
    c.train.progress = True  # tqdm bar
    c.train.plot = True  # training-curve PNG at the end
    c.train.tensorboard = True
    c.train.vocab_chunk = 0  # > 0: chunked log-probs (no [B, T, V] logits), this many vocab columns a chunk
    c.train.seq_chunk = 0
    c.train.nan_at_step = -1  # testing aid: a NaN gradient at this step, under a finite loss (-1 = never)
    c.train.break_lock = False  # take over the workdir's lock.json held by another run (docs/reliability.md)
    c.train.allow_config_change = False  # resume with a changed config, recorded in config_history.jsonl

    # tokenization: "rewardbench" (RewardBench's DPO scorer, chat template) | "trl" (the data pipeline's)
    c.score = ConfigDict(dict(mode="ref", tokenization="rewardbench"))
    # job=source_logps: InfiFPO's source models (presets, HF directories or workdirs; "," or "+").
    c.sources = ConfigDict(dict(models=""))
    # job=semantic_distance / prompt_classifier: a sentence-transformers directory ("" = the bundled
    # all-MiniLM-L6-v2); max_rows > 0: the source's first rows only (both jobs); sample_size:
    # rows of each label the prompt classifier is fit on (TRL's BCO prompt_sample_size).
    c.embed = ConfigDict(dict(model="", max_rows=0, sample_size=1024))

    # job=reward_model (alignjax/jobs/reward_model.py, alignjax/reward/).
    c.reward = ConfigDict()
    c.reward.objective = "bt"  # bt (Bradley-Terry) | secrets (the Secrets-II pipeline) | gpm | pal
    c.reward.num_heads = 1  # > 1: an ensemble of value heads (bt)
    c.reward.use_margin = False  # bt: subtract each row's 'margin' field
    c.reward.gpm_dim = 4  # GPM: the embedding's dimension 2k
    c.reward.gpm_prompt_scales = False  # GPM: prompt-dependent block scales
    c.reward.gpm_normalize = True  # GPM: unit-norm embeddings, as the GPM paper
    c.reward.pal_dim = 16  # PAL: the preference embedding's dimension
    c.reward.pal_prototypes = 2  # PAL: mixture prototypes
    c.reward.pal_users = 1  # PAL: users, each with its own mixture logits
    c.reward.eval_source = ""  # a RewardBench-format file scored after training ("" = none)
    c.reward.export_dir = ""  # value heads: write an HF AutoModelForSequenceClassification here
    # objective=secrets (alignjax/reward/secrets.py): the ensemble that measures each pair's strength.
    c.reward.secrets = ConfigDict()
    c.reward.secrets.ensemble = "models"  # models: M independent reward models; heads: M heads on one decoder
    c.reward.secrets.ensemble_size = 4  # M
    c.reward.secrets.ensemble_steps = 100  # training steps of each ensemble member
    c.reward.secrets.flip_fraction = 0.1  # share of pairs, lowest mean strength first, flipped where mu < 0
    c.reward.secrets.smooth_fraction = 0.2  # the next share, label-smoothed
    c.reward.secrets.score_batch_size = 64  # pairs per scoring batch of the ensemble

    # job=grpo | rloo | online_dpo | ppo (alignjax/jobs/online.py, alignjax/online/).
    c.online = ConfigDict()
    c.online.num_generations = 8  # completions per prompt (TRL's num_generations)
    c.online.max_new_tokens = 6  # TRL's max_completion_length (the arithmetic answer is 3 digits + <eos>)
    c.online.temperature = 1.0  # sampling temperature of the rollouts
    c.online.top_p = 1.0  # nucleus sampling of the rollouts (1 = off)
    c.online.top_k = 0  # top-k sampling of the rollouts (0 = off)
    c.online.reward = "verifier"  # verifier | reward_model | flr
    c.online.reward_path = ""  # reward_model: an exported reward model; flr: the LM ("" = the initial policy)
    c.online.follow_ups = ""  # flr: positive follow-up texts joined by "|"
    c.online.negative_follow_ups = ""  # flr: negative ones
    c.online.verifier = ""  # "" = the built-in task data.source names (arithmetic | multistep)
    c.online.reward_normalization = "none"  # none | batch | group | center
    c.online.num_iterations = 1  # optimiser steps per rollout batch (TRL's num_iterations)
    c.online.scale_rewards = "group"  # GRPO: group | batch | none (Dr. GRPO)
    c.online.normalize_advantages = False  # RLOO: standardise the advantages over the batch
    c.online.sft_steps = 2500  # > 0: an SFT stage first (config.sft), the start and the reference
    c.online.sft_dir = ""  # the SFT stage's workdir ("" = <workdir>/sft); a finished one is reused
    c.online.num_test = 200  # held-out prompts for the greedy accuracy before and after
    c.online.eval_max_new_tokens = 6  # greedy decoding length of that accuracy
    c.online.rounds = 3  # online_dpo: sampling + training rounds
    c.online.prompts_per_round = 128  # online_dpo: prompts sampled each round
    c.online.pairs = "best_worst"  # online_dpo: best_worst | all (every pair with a reward gap, margin = gap)
    c.online.reference = "fixed"  # online_dpo: fixed (the initial policy) | refresh (each round's start)
    c.online.reward_augmented = False  # online_dpo: reward-augmented relabelling of each round's pairs
    c.online.augment_prefix = ""  # its prompt condition, a format string with {score} ("" = the paper's)

    # job=quickstart (alignjax/jobs/quickstart.py): greedy accuracy on held-out arithmetic prompts.
    c.quickstart = ConfigDict()
    c.quickstart.split_seed = 0  # the permutation splitting the problems into test / validation / train
    c.quickstart.num_test = 2000  # test prompts answered before and after DPO (the reported accuracy)
    c.quickstart.num_val = 500  # validation prompts (the split hyperparameters are chosen on)
    c.quickstart.max_new_tokens = 4  # greedy decoding length: 3 answer digits + <eos>

    # job=mcts_dpo (alignjax/jobs/mcts_dpo.py): the rounds of search -> pairs -> DPO -> held-out accuracy.
    c.mcts_dpo = ConfigDict()
    c.mcts_dpo.method = "mcts"  # mcts (step-level pairs from MCTS) | instance (whole-solution pairs)
    c.mcts_dpo.rounds = 3  # search + training rounds
    c.mcts_dpo.prompts_per_round = 128  # training prompts each round (the next slice of a permutation)
    c.mcts_dpo.num_test = 200  # held-out prompts of the greedy accuracy
    c.mcts_dpo.split_seed = 0  # the permutation splitting the problems and ordering the rounds' prompts
    c.mcts_dpo.max_operand = 9  # synthetic:multistep operands 0..max_operand (99: synthetic.multistep_splits)
    c.mcts_dpo.drop_rate = 0.6  # SFT habit: each addition step drops its units carry w.p. drop_rate
    c.mcts_dpo.sft_dir = ""  # "" = <workdir>/sft; another run's sft dir reuses its finished SFT
    c.mcts_dpo.init = ""  # an HF dir / preset used as the SFT model as it is (no SFT stage)
    c.mcts_dpo.test_source = ""  # GSM8K-style held-out JSONL ("" = the last num_test rows of data.source)
    c.mcts_dpo.eval_max_new_tokens = 40  # greedy decoding length (and instance samples' length)
    c.mcts_dpo.step_loss = "mcts_dpo"  # method=mcts: the loss of the step-level pairs
    c.mcts_dpo.step_delimiter = "\n"  # the text that ends a reasoning step (one token of the tokenizer)
    c.mcts_dpo.instance_loss = "sigmoid"  # method=instance: the loss of the whole-solution pairs
    c.mcts_dpo.budget_from = ""  # instance: the MCTS workdir whose per-prompt token budget to spend
    c.mcts_dpo.budget_tokens = 0  # instance: tokens per prompt when there is no budget_from
    c.mcts_dpo.max_samples = 12  # instance: whole solutions drawn per prompt (used until the budget is spent)
    # job=repro_mcts_dpo (alignjax/repro/mcts_dpo.py): both methods per seed, each at config.seed = it.
    c.mcts_dpo.seeds = (0, 1, 2)
    # job=mcts_dpo's tree search (alignjax/search/: MCTSConfig and SearchConfig).
    c.search = ConfigDict()
    c.search.num_iterations = 4  # search iterations per tree
    c.search.num_children = 3  # children sampled per expanded node
    c.search.max_depth = 4  # reasoning steps from the root
    c.search.c_puct = 1.0  # PUCT exploration constant (the paper's c)
    c.search.length_penalty = 1.25  # the paper's lambda on a step's length in its value
    c.search.max_step_tokens = 12  # tokens of one sampled step at most
    c.search.temperature = 1.0  # sampling temperature of the steps (and of instance samples)
    c.search.top_p = 1.0  # nucleus sampling of the steps (and of instance samples; 1 = off)
    c.search.self_eval = False  # the policy judges each new step ("\n=" -> "1"/"0"); off: outcome only
    c.search.max_pairs_per_tree = 3  # step pairs kept per tree, along the chosen path
    c.search.min_q_gap = 0.0  # a pair's chosen and rejected Q must differ by more than this

    # Stage overrides of the staged jobs (quickstart, mcts_dpo, the online jobs; STAGES): sft is the SFT
    # stage, dpo the preference stage (mcts_dpo's and online_dpo's rounds). Empty = the shared keys.
    for stage in STAGES:
        c[stage] = stage_section()
    return c


def quickstart_model(vocab_size: int) -> ConfigDict:
    """``config.model.overrides`` of the quickstart-sized decoder on a built-in character vocabulary:
    2 layers, width 64, 4 heads, MLP 256, tied embeddings (about 100k parameters)."""
    return ConfigDict(
        dict(
            vocab_size=vocab_size,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            head_dim=16,
            intermediate_size=256,
            tie_word_embeddings=True,
        )
    )


def arithmetic_data(
    c: ConfigDict, task: str = "arithmetic_dpo", split: str = "train", eval_split: str = "val"
) -> None:
    """The built-in arithmetic task as ``config.data``: its ``split``, evaluation on ``eval_split``
    ("" = none), the character tokenizer, and the task's short ``max_length`` (16)."""
    c.data.source = f"synthetic:{task}:{split}"
    c.data.eval_source = f"synthetic:{task}:{eval_split}" if eval_split else ""
    c.data.tokenizer = "arithmetic"
    c.data.max_length = 16


def runlocal(c: ConfigDict) -> ConfigDict:
    """Shrinks a config to something this laptop-class machine runs in seconds. The model stays the
    one the arguments named (every experiment's default is the ``tiny`` preset)."""
    c.data.batch_size = 8
    c.data.max_length = 16
    c.data.num_eval = 32
    c.data.eval_batch_size = 32
    c.train.num_steps = 10
    c.train.checkpoint_every = 5
    return c


def fill_loss_hyperparameters(c: ConfigDict, loss_name: str, module: str = "") -> None:
    """Puts the losses' keyword-only hyperparameters (with their defaults) under ``config.loss``.

    ``loss_name`` is one name or several joined by ``+``; ``module`` (a dotted name or .py path) is
    imported first, so that it may register the loss. Existing values win (a key two mixed losses
    share takes the first one's default); an unknown loss name raises with the registered names.
    """
    import alignjax.losses as losses

    losses.load_module(module)
    if module:
        c.loss.module = module
    c.loss.name = loss_name
    for name in (n for n in loss_name.replace(",", "+").split("+") if n.strip()):
        for key, default in losses.spec(name.strip()).hyperparameters.items():
            # A None default (an optional array or "off") stays with the loss: it cannot be typed here.
            if key not in c.loss and default is not None:
                c.loss[key] = default
