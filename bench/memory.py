"""Peak memory of a case: measured in a fresh subprocess on CPU (peak RSS), by the caching allocator on CUDA.

CPU: ``python -m bench._probe`` runs every (N, mode) of one backend and preset once, in a new process whose glibc
returns every freed block of 64 KiB or more to the OS (MALLOC_MMAP_THRESHOLD_), so its resident set follows the
live tensors. For each case it resets the kernel's high-water mark (``/proc/self/clear_refs``), runs the mode and
reports VmHWM minus the RSS before the mode began (inputs already allocated; for ``backward`` the baseline is
taken before the untimed forward, so the saved forward state counts). CUDA: max_memory_allocated minus the
allocated bytes before the mode, in-process.

Before running a size it cannot afford, the suite estimates the peak from the sizes already measured (growth
N^2, conservative for the streamed backends) or, for the first size, from the number of logit matrices, and skips
with the estimate when it exceeds the share of available memory allowed (``Profile.mem_fraction``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .config import MATERIALISING
from .flops import products

PROBE_MARK = "BENCH_PROBE "
REPO_ROOT = Path(__file__).resolve().parent.parent
GiB = float(1 << 30)


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key} field")


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def available_bytes(device: str) -> int:
    """Memory a case may draw on now: MemAvailable on CPU, free device memory on CUDA."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable field")


def first_estimate(backend: str, preset: str, mode: str, rows: int, n: int, d: int, itemsize: int) -> int:
    """A priori peak for the first size of a sweep (later sizes extrapolate from measurements).

    Materialising backends: about 6 fp32 rows x N matrices alive per logit view at the peak (logits,
    log-softmaxes, target probabilities, gradients), measured for the reference at N = 1024-4096.
    Streamed backends: fp32 copies and gradients of the inputs plus a few tiles.
    """
    views = sum(1 for p in products(preset) if p.kind == "forward")
    inputs = 8 * n * d * 4
    if backend in MATERIALISING:
        return inputs + 6 * views * rows * n * 4
    return inputs + (64 << 20)


def extrapolate(measured: dict[int, int], n: int) -> int | None:
    """Peak at N from the largest smaller measured N, scaled as N^2 (an upper bound for every backend)."""
    smaller = [m for m in measured if m < n]
    if not smaller:
        return None
    base = max(smaller)
    return int(measured[base] * (n / base) ** 2)


def limit_reason(backend: str, preset: str, mode: str, n: int, d: int, itemsize: int, peaks: dict[int, int],
                 seconds: dict[int, float], budget_bytes: int, max_call_seconds: float) -> str | None:
    """Why this size must not run (memory first, then time), or None. ``peaks``/``seconds``: measured smaller N."""
    estimate = extrapolate(peaks, n)
    if estimate is None:
        estimate = first_estimate(backend, preset, mode, n, n, d, itemsize)
    if estimate > budget_bytes:
        return (
            f"{backend} at N={n} would need about {estimate / GiB:.1f} GiB (extrapolated from smaller N), more than "
            f"the {budget_bytes / GiB:.1f} GiB this machine allows a case; skipped instead of running out of memory"
        )
    return time_limit_reason(backend, n, seconds, max_call_seconds)


def time_limit_reason(backend: str, n: int, seconds: dict[int, float], max_call_seconds: float) -> str | None:
    """Why this size would run too long (one call extrapolated as N^2 from the largest measured smaller N), or None."""
    smaller = [m for m in seconds if m < n]
    if not smaller or max_call_seconds <= 0:
        return None
    base = max(smaller)
    call = seconds[base] * (n / base) ** 2
    if call <= max_call_seconds:
        return None
    return (
        f"{backend} at N={n} would take about {call:.0f} s per call (extrapolated from N={base}), over the "
        f"{max_call_seconds:.0f} s per-call limit of this profile (BENCH_MAX_CALL_SECONDS raises it)"
    )


# The probe returns every freed block to the OS at once, so its calls run several times slower than the timed ones
# (chunked clip-rd at N = 4096: about 10 s there against 2.1 s timed). Its own time guard is widened by this factor;
# the per-call limit proper is applied to the timed runs.
PROBE_SLOWDOWN = 4.0


def probe_cpu(backend: str, preset: str, ns, modes, d: int, dtype: torch.dtype, mem_fraction: float,
              max_call_seconds: float, timeout_s: float = 3600) -> dict:
    """Run ``bench._probe`` for every (N, mode); returns {(n, mode): record} (record has "status")."""
    request = {
        "backend": backend, "preset": preset, "ns": sorted(ns), "modes": list(modes), "d": d,
        "dtype": str(dtype).removeprefix("torch."), "budget_bytes": int(available_bytes("cpu") * mem_fraction),
        "max_call_seconds": max_call_seconds * PROBE_SLOWDOWN,
    }
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the OS at once: RSS tracks live memory
    env["MKL_DISABLE_FAST_MM"] = "1"  # no MKL buffer cache either
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench._probe", json.dumps(request)], cwd=REPO_ROOT, env=env,
            capture_output=True, text=True, timeout=timeout_s,
        )
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, code = f"timed out after {timeout_s:.0f} s", None
    records = {}
    for line in stdout.splitlines():
        if line.startswith(PROBE_MARK):
            record = json.loads(line[len(PROBE_MARK):])
            records[(record["n"], record["mode"])] = record
    for n in ns:
        for mode in modes:
            if (n, mode) not in records:
                killed = code is not None and code < 0
                records[(n, mode)] = {
                    "n": n, "mode": mode, "status": "killed" if killed else "error",
                    "reason": f"memory probe for {backend}/{preset} exited with {code} before N={n} {mode}"
                    + (" (killed: most likely out of memory)" if killed else "")
                    + ": " + stderr.strip()[-1500:],
                }
    return records


_PROBES: dict[tuple, dict] = {}


def cpu_peak(backend: str, preset: str, n: int, mode: str, sweep: dict, d: int, dtype: torch.dtype,
             mem_fraction: float, max_call_seconds: float) -> dict:
    """Cached probe record for one case; the first request probes the backend's whole sweep (``sweep``: mode -> ns)."""
    key = (backend, preset, d, str(dtype))
    if key not in _PROBES:
        records = {}
        # One subprocess per group of modes sharing a sweep keeps the number of fresh interpreters small.
        by_ns: dict[tuple, list] = {}
        for mode_name, ns in sweep.items():
            by_ns.setdefault(tuple(sorted(ns)), []).append(mode_name)
        for ns, mode_names in by_ns.items():
            records.update(probe_cpu(backend, preset, ns, mode_names, d, dtype, mem_fraction, max_call_seconds))
        _PROBES[key] = records
    return _PROBES[key][(n, mode)]


def cuda_peak(case, mode: str, device: str) -> int:
    """Peak bytes the caching allocator held above its state before the mode (inputs excluded)."""
    from .cases import mode_functions

    setup, target = mode_functions(case, mode, device)
    case.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    args, kwargs = setup()
    target(*args, **kwargs)
    del args, kwargs
    return torch.cuda.max_memory_allocated() - baseline
