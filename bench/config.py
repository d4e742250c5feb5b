"""What the suite measures on this machine: sizes, dtype, rounds, memory budget (one place, env-overridable).

``pytest bench/ --benchmark-only`` picks the device's default profile; ``--bench-profile`` chooses another:
- ``default``: forward+backward, every backend, the clip-rd and clip-kd presets to N = 8192 and the intra-kd, gd,
  siglip-kd and kd-ensemble weight sets to N = 2048 on CPU (about 12 minutes on 2 cores without kd-ensemble, which
  is not timed yet); on CUDA the GPU sizes, N = 4096 to 65536;
- ``full``: all three modes (forward, backward, both) and the long sweep: N = 256 to 16384 on CPU (about an hour
  on 2 cores), to 131072 on CUDA;
- ``quick``: tiny sizes, one round (CI's proof that everything runs; also ``--bench-quick``).
Environment overrides, all optional:
BENCH_PROFILE=full, BENCH_QUICK=1, BENCH_NS="256,1024", BENCH_D=512, BENCH_DTYPE=bfloat16,
BENCH_BACKENDS="chunked,floor", BENCH_PRESETS="clip-rd,clip-kd+gd", BENCH_MODES="forward+backward",
BENCH_CASE_SECONDS=2, BENCH_MAX_CALL_SECONDS=25, BENCH_MEM_FRACTION=0.7,
BENCH_PEAK_TFLOPS=989 (device peak for the "share of peak" column).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from kernels import PRESETS as LOSS_PRESETS

QUICK_ENV = "BENCH_QUICK"
PROFILE_ENV = "BENCH_PROFILE"
PROFILES = ("default", "full", "quick")
MODES = ("forward", "backward", "forward+backward")
# The loss weights a case runs, by name: the two published presets, and four sets for the other kernel paths (the
# intra-modal term, gradient distillation's P @ Y and P^T @ X streams, the sigmoid terms as MobileCLIP2 trains:
# SigLIP's loss and the sigmoid distillation, without the softmax task term, and a teacher ensemble).
WEIGHT_SETS = {
    "clip-rd": LOSS_PRESETS["clip-rd"],
    "clip-kd": LOSS_PRESETS["clip-kd"],
    "intra-kd": LOSS_PRESETS["intra-kd"],
    "clip-kd+gd": {**LOSS_PRESETS["clip-kd"], "gd": 1.0},
    "siglip-kd": {"task": 0.0, "siglip": 1.0, "sigmoid_kd": 1.0},
    "kd-ensemble": {"task": 1.0, "hrd": 1.0},
}
# Weight sets distilled from a teacher ensemble: (teachers, ensemble mode). kd-ensemble is MobileCLIP's dataset
# reinforcement: the image-text logits (CLIP-KD's hrd) of two teachers averaged after the softmax, with the task term.
ENSEMBLES = {"kd-ensemble": (2, "average-after-softmax")}
PRESETS = ("clip-rd", "clip-kd")  # the published presets: every backend, the largest sizes
EXTRA_SETS = ("intra-kd", "clip-kd+gd", "siglip-kd", "kd-ensemble")  # other kernel paths, at smaller sizes
# "floor" is not a loss backend: the matrix multiplications alone (bench.cases.FloorCase).
LOSS_BACKENDS = ("reference", "compiled", "chunked", "triton")
ALL_BACKENDS = LOSS_BACKENDS + ("floor",)
# Backends that hold every rows x N logit matrix at once; their memory grows as N^2.
MATERIALISING = ("reference", "compiled")


def weights_of(name: str) -> dict[str, float]:
    """The loss weights of a case's weight set (or of any kernels preset by name)."""
    if name in WEIGHT_SETS:
        return dict(WEIGHT_SETS[name])
    if name in LOSS_PRESETS:
        return dict(LOSS_PRESETS[name])
    raise ValueError(f"unknown weight set {name!r}; expected one of {list(WEIGHT_SETS)}")


def ensemble_of(name: str) -> tuple[int, str]:
    """(teachers, ensemble mode) of a weight set: one teacher unless it is in ENSEMBLES."""
    return ENSEMBLES.get(name, (1, "average-after-softmax"))


def quick_mode() -> bool:
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def profile_name() -> str:
    """default, full or quick: --bench-profile (through BENCH_PROFILE), or BENCH_QUICK=1 for quick."""
    if quick_mode():
        return "quick"
    name = os.environ.get(PROFILE_ENV, "default").strip().lower() or "default"
    if name not in PROFILES:
        raise ValueError(f"--bench-profile / {PROFILE_ENV}: unknown profile {name!r}; expected one of {PROFILES}")
    return name


def _env_list(name: str, default: tuple) -> tuple:
    raw = os.environ.get(name)
    if not raw:
        return tuple(default)
    return tuple(item.strip() for item in raw.split(",") if item.strip())


@dataclass(frozen=True)
class Profile:
    """Sizes and repetition policy of one run of the suite."""

    name: str  # "quick", "cpu" or "gpu"
    device: str
    dtype: torch.dtype
    d: int
    ns: tuple[int, ...]
    # Largest N per backend (time, not memory, bounds the CPU sweep); memory limits are decided per case.
    max_n: dict
    # Extra N points run only in forward+backward mode (the streamed backends past the reference's reach).
    large_ns: tuple[int, ...]  # larger sizes in forward+backward only, limited by memory and call time
    large_backends: tuple[str, ...]
    backends: tuple[str, ...]
    compiled_presets: tuple[str, ...]  # torch.compile costs ~30 s per preset: quick mode compiles one
    presets: tuple[str, ...]  # weight-set names (WEIGHT_SETS)
    extra_max_n: int  # largest N of the EXTRA_SETS
    modes: tuple[str, ...]
    case_seconds: float  # timed seconds to aim at per case; rounds = clamp(case_seconds / one call)
    max_call_seconds: float  # sizes whose one call would take longer (extrapolated) are skipped with the estimate
    max_rounds: int
    mem_fraction: float  # share of currently available memory a case may use

    def sweep(self, backend: str, mode: str, preset: str = "clip-rd") -> tuple[int, ...]:
        ns = [n for n in self.ns if n <= self.max_n.get(backend, max(self.ns))]
        if mode == "forward+backward" and backend in self.large_backends:
            ns += [n for n in self.large_ns if n not in ns]
        if preset in EXTRA_SETS:
            ns = [n for n in ns if n <= self.extra_max_n]
        return tuple(sorted(ns))

    def all_ns(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.ns) | set(self.large_ns)))


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"BENCH_DTYPE: {name!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    return value


@lru_cache(maxsize=None)
def profile() -> Profile:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    available = [b for b in ALL_BACKENDS if b != "triton" or cuda]
    name = profile_name()
    every_set = PRESETS + EXTRA_SETS
    if name == "quick":
        base = dict(
            name="quick", d=32, ns=(32, 128), max_n={"compiled": 32}, compiled_presets=("clip-kd",), large_ns=(),
            large_backends=(), case_seconds=0.0, max_rounds=1, max_call_seconds=0.0,
            dtype="bfloat16" if cuda else "float32", modes=MODES, extra_max_n=128,
        )
    elif cuda:
        big = name == "full"
        base = dict(
            name="gpu-full" if big else "gpu", d=512,
            ns=(1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072) if big else (4096, 8192, 16384, 32768, 65536),
            max_n={"chunked": 65536}, large_ns=(), large_backends=(),
            case_seconds=1.0, max_rounds=10, max_call_seconds=30.0, dtype="bfloat16",
            modes=MODES if big else ("forward+backward",), extra_max_n=131072 if big else 32768,
        )
    elif name == "full":
        base = dict(
            name="cpu-full", d=512, ns=(256, 512, 1024, 2048, 4096), max_n={}, large_ns=(8192, 16384),
            large_backends=ALL_BACKENDS, case_seconds=2.0, max_rounds=5, max_call_seconds=40.0, dtype="float32",
            modes=MODES, extra_max_n=8192,
        )
    else:  # the default CPU run: about 12 minutes on 2 quiet cores
        base = dict(
            name="cpu", d=512, ns=(1024, 2048, 4096, 8192), max_n={}, large_ns=(), large_backends=(),
            case_seconds=1.0, max_rounds=3, max_call_seconds=40.0, dtype="float32", modes=("forward+backward",),
            extra_max_n=2048, compiled_presets=PRESETS,
        )
    ns = tuple(int(n) for n in _env_list("BENCH_NS", base["ns"]))
    backends = _env_list("BENCH_BACKENDS", available)
    unknown = sorted(set(backends) - set(ALL_BACKENDS))
    if unknown:
        raise ValueError(f"BENCH_BACKENDS: unknown backend(s) {unknown}; expected a subset of {list(ALL_BACKENDS)}")
    presets = _env_list("BENCH_PRESETS", every_set)
    unknown = sorted(set(presets) - set(WEIGHT_SETS))
    if unknown:
        raise ValueError(f"BENCH_PRESETS: unknown weight set(s) {unknown}; expected a subset of {list(WEIGHT_SETS)}")
    modes = _env_list("BENCH_MODES", base["modes"])
    bad_modes = sorted(set(modes) - set(MODES))
    if bad_modes:
        raise ValueError(f"BENCH_MODES: unknown mode(s) {bad_modes}; expected a subset of {list(MODES)}")
    return Profile(
        name=base["name"],
        device=device,
        dtype=_dtype(os.environ.get("BENCH_DTYPE", base["dtype"])),
        d=int(os.environ.get("BENCH_D", base["d"])),
        ns=ns,
        max_n=base["max_n"],
        large_ns=() if "BENCH_NS" in os.environ else base["large_ns"],
        large_backends=base["large_backends"],
        backends=tuple(b for b in backends if b in available),
        compiled_presets=base.get("compiled_presets", presets),
        presets=presets,
        extra_max_n=base["extra_max_n"],
        modes=modes,
        case_seconds=float(os.environ.get("BENCH_CASE_SECONDS", base["case_seconds"])),
        max_rounds=base["max_rounds"],
        max_call_seconds=float(os.environ.get("BENCH_MAX_CALL_SECONDS", base["max_call_seconds"])),
        mem_fraction=float(os.environ.get("BENCH_MEM_FRACTION", 0.7)),
    )


def device_peak_flops(device: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the GPU for this dtype (tensor cores for bf16/fp16, TF32 off for fp32), or None.

    From the vendors' data sheets (dense, no sparsity); BENCH_PEAK_TFLOPS overrides. None on CPU: the floor
    provider's GFLOP/s is this machine's practical matmul peak instead.
    """
    override = os.environ.get("BENCH_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    half = dtype in (torch.bfloat16, torch.float16)
    table = (  # (name fragment, half-precision tensor TFLOP/s, fp32 TFLOP/s)
        ("H200", 989.0, 67.0),
        ("H100 PCIe", 756.0, 51.0),
        ("H100", 989.0, 67.0),
        ("A100", 312.0, 19.5),
        ("L40S", 362.0, 91.6),
        ("A10", 125.0, 31.2),
        ("L4", 121.0, 30.3),
    )
    for fragment, half_tflops, fp32_tflops in table:
        if fragment in name:
            return (half_tflops if half else fp32_tflops) * 1e12
    return None
