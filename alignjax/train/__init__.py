"""alignjax.train."""
