"""Peak-memory probe, run by ``bench.memory.probe_cpu`` in a fresh interpreter: ``python -m bench._probe '<json>'``.

Request: {"backend", "preset", "ns", "modes", "d", "dtype", "budget_bytes", "max_call_seconds"}. For each N
(ascending) and mode it prints one line ``BENCH_PROBE {"n", "mode", "status": "ok"|"skipped", "peak_extra_bytes",
"baseline_rss_bytes", "seconds", "reason"}``. A size whose extrapolated peak or call time exceeds the limits is
skipped with the reason.
"""
from __future__ import annotations

import gc
import json
import sys
import time

import torch

from .cases import build_case, make_inputs, mode_functions
from .memory import PROBE_MARK, limit_reason, reset_peak_rss, status_bytes


def emit(record: dict) -> None:
    print(PROBE_MARK + json.dumps(record), flush=True)


def measure(case, mode: str) -> tuple[int, int, float]:
    """(peak RSS above the pre-mode baseline, that baseline, seconds of the timed part)."""
    setup, target = mode_functions(case, mode, "cpu")
    case.zero_grad()
    gc.collect()
    baseline = status_bytes("VmRSS")
    reset_peak_rss()
    args, kwargs = setup()
    if mode == "backward":
        reset_peak_rss()  # the forward's own transient peak is not part of the backward's
    start = time.perf_counter()
    target(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM") - baseline
    del args, kwargs
    return peak, baseline, seconds


def main(request: dict) -> None:
    backend, preset, d = request["backend"], request["preset"], request["d"]
    dtype = getattr(torch, request["dtype"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    # Libraries initialise thread pools and kernels on first use: pay that before measuring anything.
    # (The compiled backend compiles each shape before its measurement instead.)
    if backend != "compiled":
        warm = build_case(backend, preset, make_inputs(32, d, dtype, "cpu"))
        for mode in request["modes"]:
            setup, target = mode_functions(warm, mode, "cpu")
            args, kwargs = setup()
            target(*args, **kwargs)
        del warm
    peaks: dict[str, dict[int, int]] = {mode: {} for mode in request["modes"]}
    seconds: dict[str, dict[int, float]] = {mode: {} for mode in request["modes"]}
    broken = None  # torch.compile failure: every later case is skipped with it
    for n in sorted(request["ns"]):
        inputs = make_inputs(n, d, dtype, "cpu")
        case = build_case(backend, preset, inputs)
        for mode in request["modes"]:
            reason = broken or limit_reason(
                backend, preset, mode, n, d, itemsize, peaks[mode], seconds[mode],
                request["budget_bytes"], request["max_call_seconds"],
            )
            if reason:
                emit({"n": n, "mode": mode, "status": "skipped", "reason": reason})
                continue
            if backend == "compiled":  # compile this shape (forward and backward graphs) outside the measurement
                try:
                    setup, target = mode_functions(case, "forward+backward", "cpu")
                    setup()
                    target()
                except Exception as exc:  # noqa: BLE001 - any compiler failure means "does not compile here"
                    broken = f"torch.compile of the reference failed here: {type(exc).__name__}: {str(exc)[:400]}"
                    emit({"n": n, "mode": mode, "status": "skipped", "reason": broken})
                    continue
            peak, baseline, elapsed = measure(case, mode)
            peaks[mode][n], seconds[mode][n] = peak, elapsed
            emit({
                "n": n, "mode": mode, "status": "ok", "peak_extra_bytes": peak, "baseline_rss_bytes": baseline,
                "seconds": elapsed,
            })
        del case, inputs
        gc.collect()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench._probe '<json request>' (see bench/memory.py)")
    main(json.loads(sys.argv[1]))
