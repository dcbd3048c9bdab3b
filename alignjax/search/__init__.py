"""alignjax.search."""
