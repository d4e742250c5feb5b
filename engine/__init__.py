"""Distillation engine: procedural data (synthetic), shard streaming (data), teacher store (store, precompute),
default teacher (teacher), training loop (train), evaluation (eval). Entry points: ``python -m engine.train``,
``engine.precompute``, ``engine.teacher``, ``engine.eval``, ``engine.synthetic``.
"""
