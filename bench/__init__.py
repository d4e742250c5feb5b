"""Benchmarks of the distillation objective and the training engine (pytest-benchmark).

``pytest bench/ --benchmark-only`` times every backend of ``kernels.clip_rd_loss`` (reference, chunked, a
``torch.compile``d reference, triton on CUDA) against a matmul ``floor`` over modes, presets and an N sweep, with
peak memory, GFLOP/s and bytes next to each time; ``python -m bench.report <benchmark.json>`` turns the result into
a Markdown table and log-log plots under ``bench/results/``. ``BENCH_QUICK=1`` (or ``--bench-quick``) shrinks
everything to CI size.
"""
