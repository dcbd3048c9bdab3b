"""alignjax.data."""
