"""alignjax.models."""
