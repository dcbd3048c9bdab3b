"""Named model shapes: ``tiny`` and ``bench-7m`` for tests/benchmarks, and real checkpoints' configs.

The real presets copy each model's published ``config.json`` values; ``from_pretrained(name)``
gives them random weights (for shape/throughput work), a checkpoint directory gives real ones.

The real presets scan their layers (``scan_layers=True``): they are 16-36 layers deep, where an
unrolled DPO step's compile time and program size grow with every layer and a scanned one's stay
flat (``bench/compile_layers.py``), which is what a pod slice pays at every start and restart;
MaxText and Levanter scan by default for the same reason. ``tiny`` and ``bench-7m`` stay unrolled:
at 2-4 layers there is nothing to gain, and tests and benchmarks address their layers by name.
"""

from __future__ import annotations

from alignjax.models.config import ModelConfig, RopeScaling

_LLAMA31_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)

_UNROLLED = ("tiny", "bench-7m")

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=256,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
    ),
    "bench-7m": ModelConfig(
        model_type="llama",
        vocab_size=8192,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=688,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
    ),
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": ModelConfig(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        intermediate_size=11008,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    # meta-llama/Llama-3.2-1B
    "llama3-1b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    # meta-llama/Meta-Llama-3-8B (no rope scaling, 8k context)
    "llama3-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    # meta-llama/Llama-3.1-8B
    "llama3.1-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rope_theta=500000.0,
        rope_scaling=_LLAMA31_SCALING,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
    ),
    # mistralai/Mistral-7B-v0.1 (4096-token sliding window)
    "mistral-7b": ModelConfig(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        sliding_window=4096,
    ),
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=4864,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=True,
        max_position_embeddings=32768,
    ),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=18944,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
        max_position_embeddings=131072,
    ),
    # Qwen/Qwen3-0.6B
    "qwen3-0.6b": ModelConfig(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        qk_norm=True,
        max_position_embeddings=40960,
    ),
    # Qwen/Qwen3-8B
    "qwen3-8b": ModelConfig(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qk_norm=True,
        max_position_embeddings=40960,
    ),
}

PRESETS = {name: c if name in _UNROLLED else c.replace(scan_layers=True) for name, c in PRESETS.items()}
