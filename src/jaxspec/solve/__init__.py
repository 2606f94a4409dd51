"""Batched dense linear algebra of spectro-perfectionism (knows nothing of PSFs or files)."""

__all__: list[str] = []
