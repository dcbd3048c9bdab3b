"""Model configuration for the decoder family (Llama, Mistral, Qwen2, Qwen3) and its HF mapping."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_KERNELS = ("auto", "xla", "splash")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


LORA_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_QUANTIZE = ("none", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the decoder's projections ("LoRA", Hu et al., arXiv:2106.09685):
    ``y = x W + (alpha / rank) (x A) B`` with ``A`` [in, rank], ``B`` [rank, out] zero-initialised.

    ``targets``: ``fnmatch`` patterns matched against a projection's name (``q_proj``) and its path
    in the layer (``self_attn/q_proj``); the default is every linear layer (PEFT's ``all-linear``).
    ``quantize``: the frozen base kernels of the targeted projections stored as ``int8``
    (per-output-channel absmax) or ``nf4`` (QLoRA's 4-bit NormalFloat, blocks of 64,
    arXiv:2305.14314), dequantized to the compute dtype where used; ``none`` keeps them as they are.
    """

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_ALL_LINEAR
    quantize: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank <= 0:
            raise ValueError(f"config.model.lora.rank={self.rank} must be > 0 (0 = no adapters)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config.model.lora.dropout={self.dropout} must be in [0, 1)")
        if self.quantize not in LORA_QUANTIZE:
            raise ValueError(
                f"config.model.lora.quantize={self.quantize!r}; choose one of {list(LORA_QUANTIZE)}"
            )

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def applies(self, name: str, parent: str) -> bool:
        """Whether the projection ``name`` inside ``parent`` (``self_attn``/``mlp``) gets an adapter."""
        import fnmatch

        return any(fnmatch.fnmatchcase(n, pat) for pat in self.targets for n in (name, f"{parent}/{name}"))


AUX_HEADS = "aux_heads"  # params[AUX_HEADS]: the ModelConfig.aux_heads classifiers, beside the decoder


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of one decoder-only transformer.

    ``attention_bias`` adds biases to the q/k/v projections (Qwen2 always; Llama/Qwen3 when their
    config sets ``attention_bias``); ``attention_out_bias`` adds one to the output projection (only
    Llama/Qwen3 with ``attention_bias``). ``qk_norm`` is Qwen3's per-head RMSNorm on q and k before
    RoPE. ``sliding_window`` (Mistral v0.1) limits attention to the last ``sliding_window``
    positions; ``None`` means full attention. ``dtype`` is the compute dtype, ``param_dtype`` the
    storage dtype. ``remat`` is one of ``REMAT_POLICIES`` (per decoder layer). ``attention_kernel``
    (training forward; decoding always uses XLA's): ``"auto"`` takes cuDNN flash attention on GPUs and
    the Pallas splash kernel on TPUs where they apply, else XLA's; ``"xla"`` always XLA's;
    ``"splash"`` the splash kernel wherever it applies (interpret mode off TPU: for tests).
    ``scan_layers`` runs the decoder layers as one ``nn.scan`` over params stacked on a leading
    ``layers`` axis (``params["layers"]``, and a stacked KV cache) instead of a Python loop over
    ``layers_0 .. layers_{L-1}``: the same values, and a compile time that does not grow with depth.
    ``lora`` (a :class:`LoraConfig`, or None) adds low-rank adapters (``alignjax.models.lora``).
    ``aux_heads``: ``(name, outputs)`` linear heads on hidden states (``params["aux_heads"]``, trained
    with the policy; ``alignjax.models.heads.AuxHeads``), such as SPO's preference-degree classifier
    and SparsePO's learned masks; HF export leaves them out.
    """

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention_kernel: str = "auto"
    scan_layers: bool = False
    lora: LoraConfig | None = None
    aux_heads: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"ModelConfig.model_type={self.model_type!r} is not supported; "
                f"supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; choose one of {list(REMAT_POLICIES)}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(
                f"ModelConfig.attention_kernel={self.attention_kernel!r}; "
                f"choose one of {list(ATTENTION_KERNELS)}"
            )
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"ModelConfig.{key}={getattr(self, key)!r}; use float32, bfloat16 or float16"
                )
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        heads = tuple((str(name), int(classes)) for name, classes in self.aux_heads)  # JSON: lists
        if any(classes < 1 for _, classes in heads) or len({n for n, _ in heads}) != len(heads):
            raise ValueError(f"ModelConfig.aux_heads={heads}: distinct names, at least 1 output each")
        object.__setattr__(self, "aux_heads", heads)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "<config>", **overrides: Any) -> ModelConfig:
        """Maps a Hugging Face ``config.json`` dict (transformers 4.x or 5.x keys) to a ModelConfig.

        ``source`` names the file in error messages. ``overrides`` (e.g. ``dtype``) win.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not supported; supported model types: "
                f"{list(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str) -> Any:
            if key not in hf:
                raise ValueError(f"{source}: required key {key!r} is missing (model_type={model_type!r})")
            return hf[key]

        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("mlp_bias", False):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        # transformers 5 moves rope_theta/rope_scaling into "rope_parameters".
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ValueError(
                f"{source}: rope_type={rope_type!r} is not supported (supported: 'default', 'llama3')"
            )
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        bias = bool(hf.get("attention_bias", False))
        qkv_bias, out_bias = (True, False) if model_type == "qwen2" else (bias, bias)
        if model_type == "mistral":
            qkv_bias = out_bias = False
        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window = None
        dtype = hf.get("dtype", hf.get("torch_dtype")) or "float32"
        kwargs = dict(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(need("intermediate_size")),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            sliding_window=int(window) if window else None,
            param_dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
        )
        kwargs["dtype"] = kwargs["param_dtype"]
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (keys for both transformers 4.x and 5.x)."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope = {
                "rope_theta": self.rope_theta,
                "rope_type": "llama3",
                **dataclasses.asdict(self.rope_scaling),
            }
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "dtype": self.param_dtype,
            "torch_dtype": self.param_dtype,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if self.model_type in ("llama", "qwen3"):
            # HF's flag adds biases to all four projections; zeros are written where ours has none.
            hf["attention_bias"] = self.attention_bias or self.attention_out_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = False
        hf["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = self.sliding_window is not None
        return hf
