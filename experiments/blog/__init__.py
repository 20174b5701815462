"""Reproductions of blog posts about synthetic gradients (``../shared/papers/``)."""
