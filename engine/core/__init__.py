"""Foundations every part shares: the user-error types, atomic writes, the training checkpoint."""
