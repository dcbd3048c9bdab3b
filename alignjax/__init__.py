"""alignjax: preference alignment of language models in JAX/Flax, sharded from one CPU to a pod."""

__version__ = "0.1.0"
