"""alignjax.eval."""
