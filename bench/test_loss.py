"""Loss benchmarks: every backend of ``clip_rd_loss`` and the matmul floor, over mode x weight set x N.

One benchmark group per (weight set, mode, N), so pytest-benchmark's table compares backends at one size. Before a
backend is timed, the loss value of its warm-up call is checked against the reference's at the same inputs (the
chunked backend's where the reference cannot run): a fast wrong kernel fails the run. Next to the time each case
records in ``extra_info``: peak extra memory (bench.memory), FLOPs and GFLOP/s (bench.flops), bytes moved, the
value check, and on a GPU the share of the device's peak; and it prints one line as it finishes. Sizes the machine
cannot afford are skipped with the estimate that ruled them out (see the summary at the end of the run).
"""
from __future__ import annotations

import gc

import pytest
import torch

from . import flops, memory
from .cases import ValueLedger, build_case, make_inputs, mode_functions, rounds_for, run_once
from .config import LOSS_BACKENDS, profile
from .report import case_line

PROFILE = profile()
# Order: one group after another, backends together inside a group.
BACKEND_ORDER = {name: i for i, name in enumerate(("floor",) + LOSS_BACKENDS)}


def _cases():
    cases = []
    for preset in PROFILE.presets:
        for mode in PROFILE.modes:
            for n in PROFILE.all_ns():
                for backend in sorted(PROFILE.backends, key=BACKEND_ORDER.get):
                    if backend == "compiled" and preset not in PROFILE.compiled_presets:
                        continue
                    if n in PROFILE.sweep(backend, mode, preset):
                        cases.append(pytest.param(backend, preset, mode, n, id=f"{preset}-{mode}-N{n}-{backend}"))
    return cases


# The current size's inputs, shared by every backend of a group (regenerating them costs little, holding many
# sizes costs memory).
_INPUTS: dict[int, dict] = {}
# Measured call times (every device) and CUDA peaks per (backend, preset, mode) -> {n: value}, to foresee the next size.
_SECONDS: dict[tuple, dict[int, float]] = {}
_CUDA_PEAKS: dict[tuple, dict[int, int]] = {}
_COMPILE_FAILED: dict[str, str] = {}
# Loss values of the warm-up calls, checked against the reference's; the reference's median per (preset, mode, N).
_VALUES = ValueLedger()
_REFERENCE_SECONDS: dict[tuple, float] = {}


def _inputs(n: int) -> dict:
    if n not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        _INPUTS[n] = make_inputs(n, PROFILE.d, PROFILE.dtype, PROFILE.device)
    return _INPUTS[n]


def _cpu_memory(backend, preset, mode, n) -> dict:
    sweep = {m: PROFILE.sweep(backend, m) for m in PROFILE.modes}
    record = memory.cpu_peak(
        backend, preset, n, mode, sweep, PROFILE.d, PROFILE.dtype, PROFILE.mem_fraction, PROFILE.max_call_seconds
    )
    if record["status"] in ("skipped", "killed"):
        pytest.skip(record["reason"])
    if record["status"] != "ok":
        pytest.fail(record["reason"])
    return record


@pytest.mark.parametrize("backend,preset,mode,n", _cases())
def test_loss(benchmark, record_property, backend, preset, mode, n):
    device, dtype, d = PROFILE.device, PROFILE.dtype, PROFILE.d
    rows = n  # single device: every row is an anchor
    itemsize = torch.empty((), dtype=dtype).element_size()
    benchmark.group = f"{preset} | {mode} | N={n}"
    if backend == "compiled" and preset in _COMPILE_FAILED:
        pytest.skip(_COMPILE_FAILED[preset])

    key = (backend, preset, mode)
    reason = memory.time_limit_reason(backend, n, _SECONDS.get(key, {}), PROFILE.max_call_seconds)
    if reason:
        pytest.skip(reason)
    probe = None
    if device == "cpu" and backend != "floor":  # the floor's memory is its fixed tile: not worth a probe run
        probe = _cpu_memory(backend, preset, mode, n)
    else:
        reason = memory.limit_reason(
            backend, preset, mode, n, d, itemsize, _CUDA_PEAKS.get(key, {}), {},
            int(memory.available_bytes(device) * PROFILE.mem_fraction), 0.0,
        )
        if reason:
            pytest.skip(reason)

    case = build_case(backend, preset, _inputs(n))
    try:
        # Warm-up: compiles (torch.compile, Triton) and measures one call to choose the number of rounds.
        seconds, value = run_once(case, mode, device)
        # compilers specialise the first shape, and torch.compile recompiles once more for dynamic shapes at the
        # second: one more warm-up call there (and wherever a call is short anyway)
        compiling = backend in ("compiled", "triton") and len(_SECONDS.get(key, {})) < 2
        if compiling or seconds < PROFILE.case_seconds:
            seconds, value = run_once(case, mode, device)
        if probe:
            peak = probe["peak_extra_bytes"]
        else:
            peak = memory.cuda_peak(case, mode, device) if device == "cuda" else None
    except torch.OutOfMemoryError as exc:
        pytest.skip(f"{backend} at N={n} ran out of device memory: {str(exc).splitlines()[0]}")
    except Exception as exc:
        if backend != "compiled":
            raise
        _COMPILE_FAILED[preset] = f"torch.compile of the reference failed here: {type(exc).__name__}: {exc}"[:600]
        pytest.skip(_COMPILE_FAILED[preset])
    checked = _VALUES.check(backend, preset, n, value, dtype)
    _SECONDS.setdefault(key, {})[n] = seconds
    if device != "cpu":
        _CUDA_PEAKS.setdefault(key, {})[n] = peak

    setup, target = mode_functions(case, mode, device)
    rounds = rounds_for(seconds, PROFILE.case_seconds, PROFILE.max_rounds)
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)

    flop = flops.flop_count(preset, mode, rows, n, d)
    # With --benchmark-disable pytest-benchmark runs the target once and keeps no statistics.
    median = benchmark.stats.stats.median if benchmark.stats else seconds
    if backend == "reference":
        _REFERENCE_SECONDS[(preset, mode, n)] = median
    peak_flops = None
    if device == "cuda":
        from .config import device_peak_flops

        peak_flops = device_peak_flops(device, dtype)
    benchmark.extra_info.update({
        "backend": backend, "preset": preset, "mode": mode, "n": n, "rows": rows, "d": d,
        "dtype": str(dtype).removeprefix("torch."), "device": device, "profile": PROFILE.name,
        "peak_extra_bytes": None if peak is None else int(peak),
        "memory_source": ("subprocess peak RSS (VmHWM - VmRSS before)" if probe else
                          "torch.cuda.max_memory_allocated" if device == "cuda" else "not measured (floor)"),
        "flops": flop, "gflops_per_s": flop / median / 1e9,
        "bytes_min": flops.bytes_min(mode, rows, n, d, itemsize),
        "bytes_logits": flops.bytes_logits(preset, mode, rows, n) if backend in ("reference", "compiled") else 0,
        "device_peak_flops": peak_flops,
        "peak_share": (flop / median / peak_flops) if peak_flops else None,
        "probe_seconds": probe["seconds"] if probe else None,
        "reference_ratio": (median / _REFERENCE_SECONDS[(preset, mode, n)]
                            if (preset, mode, n) in _REFERENCE_SECONDS else None),
        **checked,
    })
    record_property("bench_line", case_line({**benchmark.extra_info, "median_s": median}))
