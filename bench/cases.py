"""What one benchmark case runs: inputs, a backend's forward and backward, and the three timed modes.

A case is (backend, preset, N, D, dtype, device). Loss backends call ``kernels.clip_rd_loss`` as a training step
does: student embeddings and the learnable scales require gradients, the teacher embeddings do not. A weight set of
``config.ENSEMBLES`` distils from a teacher ensemble: its further members are drawn from the inputs' teacher
(``ensemble_members``), so every case of one size shares one set of inputs. ``compiled`` is
``torch.compile`` of the reference call. ``floor`` runs only the matrix multiplications the objective cannot avoid
(``bench.flops.products``), column-tiled so that it never holds an N x N matrix itself.

Modes: ``forward`` = the loss with autograd recording, as in training (the chunked backend computes its gradients
here); ``backward`` = ``total.backward()`` after an untimed forward; ``forward+backward`` = both.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kernels import clip_rd_loss, spec

from .config import ensemble_of, weights_of
from .flops import ANCHOR_KINDS, LOGITS_KINDS, mode_products

SCALE_NAMES = ("student_scale", "teacher_scale", "lam_img", "lam_txt", "kappa", "student_bias", "teacher_bias")
# Elements of the floor's (rows x columns) product tile: 16 Mi on CPU (64 MiB fp32), 64 Mi on GPU.
FLOOR_TILE_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}


def make_inputs(n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Four L2-normalised (N, D) embeddings (teacher ones correlated with the student's), the five scales and the
    student's and teacher's logit biases (SigLIP's initial -10; the student's is learnable)."""
    gen = torch.Generator().manual_seed(seed)
    s_img = torch.randn(n, d, generator=gen)
    s_txt = s_img + 0.8 * torch.randn(n, d, generator=gen)  # paired captions: positives are the likeliest columns
    t_img = s_img + 0.5 * torch.randn(n, d, generator=gen)
    t_txt = s_txt + 0.5 * torch.randn(n, d, generator=gen)
    out = {}
    for name, value in (("s_img", s_img), ("s_txt", s_txt), ("t_img", t_img), ("t_txt", t_txt)):
        out[name] = F.normalize(value, dim=1).to(device=device, dtype=dtype).requires_grad_(name.startswith("s_"))
    scale = lambda v, grad: torch.tensor(v, dtype=torch.float32, device=device, requires_grad=grad)  # noqa: E731
    out["student_scale"] = scale(1 / 0.07, True)
    out["teacher_scale"] = scale(100.0, False)
    for name in ("lam_img", "lam_txt", "kappa"):
        out[name] = scale(spec.DEFAULT_MULTIPLIER, True)
    out["student_bias"] = scale(-10.0, True)
    out["teacher_bias"] = scale(-10.0, False)
    return out


def ensemble_members(preset: str, inputs: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The teacher ensemble of a weight set: {"t_img", "t_txt", "teacher_scale"} lists of its members, the inputs'
    teacher first; member k >= 1 is that teacher plus noise (a teacher that agrees with it in part) at a scale of its
    own. One member (the inputs' teacher) for a weight set without an ensemble."""
    teachers, _ = ensemble_of(preset)
    out = {"t_img": [inputs["t_img"]], "t_txt": [inputs["t_txt"]], "teacher_scale": [inputs["teacher_scale"]]}
    gen = torch.Generator().manual_seed(1)
    for k in range(1, teachers):
        for name in ("t_img", "t_txt"):
            teacher = inputs[name]
            noise = torch.randn(teacher.shape, generator=gen).to(device=teacher.device, dtype=teacher.dtype)
            out[name].append(F.normalize(teacher + 0.5 * noise, dim=1))
        out["teacher_scale"].append(inputs["teacher_scale"] * (1.0 - 0.2 * k))
    return out


def _loss_total(backend: str, preset: str) -> Callable[..., torch.Tensor]:
    weights = weights_of(preset)
    _, ensemble = ensemble_of(preset)

    def total(s_img, s_txt, t_img, t_txt, student_scale, teacher_scale, lam_img, lam_txt, kappa, student_bias,
              teacher_bias):
        return clip_rd_loss(
            s_img, s_txt, t_img, t_txt, student_scale=student_scale, teacher_scale=teacher_scale,
            student_bias=student_bias, teacher_bias=teacher_bias, lam_img=lam_img, lam_txt=lam_txt, kappa=kappa,
            weights=weights, backend=backend, ensemble=ensemble,
        )["total"]

    return total


_COMPILED: dict[str, Callable] = {}


def compiled_reference(preset: str) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of the reference objective, one compiled function per preset (shapes recompile lazily)."""
    if preset not in _COMPILED:
        _COMPILED[preset] = torch.compile(_loss_total("reference", preset))
    return _COMPILED[preset]


class LossCase:
    """One backend of ``clip_rd_loss``: forward returns the differentiable total, backward fills the gradients."""

    def __init__(self, backend: str, preset: str, inputs: dict[str, torch.Tensor]):
        self.inputs = inputs
        self.args = [inputs[k] for k in ("s_img", "s_txt", "t_img", "t_txt", *SCALE_NAMES)]
        members = ensemble_members(preset, inputs)
        if len(members["t_img"]) > 1:  # lists of the members in the teacher arguments' places
            for index, name in ((2, "t_img"), (3, "t_txt"), (5, "teacher_scale")):
                self.args[index] = members[name]
        self.fn = compiled_reference(preset) if backend == "compiled" else _loss_total(backend, preset)
        self.leaves = [t for t in self.args if isinstance(t, torch.Tensor) and t.requires_grad]

    def zero_grad(self):
        for tensor in self.leaves:
            tensor.grad = None

    def forward(self) -> torch.Tensor:
        return self.fn(*self.args)

    def backward(self, total: torch.Tensor):
        total.backward()


class FloorCase:
    """Only the unavoidable products (bench.flops): forward (rows x D)@(D x N) logits, backward G@Y and G^T@X per
    student side (and gradient distillation's R Y and R^T X streams).

    Tiled over column blocks into one reused buffer (its contents stand in for the logits / their gradients), so
    the floor's memory stays O((N + tile) * D) and its time is the matmuls alone.
    """

    def __init__(self, preset: str, inputs: dict[str, torch.Tensor]):
        x = {name: inputs[name].detach() for name in spec.INPUTS}
        members = ensemble_members(preset, inputs)  # an ensemble's further teachers, named as the kernels name them
        for k in range(1, len(members["t_img"])):
            x.update(zip(spec.teacher_inputs(k), (members["t_img"][k].detach(), members["t_txt"][k].detach())))
        self.x = x
        n = x["s_img"].shape[0]
        device = x["s_img"].device
        self.columns = max(1, min(n, FLOOR_TILE_ELEMENTS[device.type] // n))
        self.buffer = torch.randn(n * self.columns, device=device).to(x["s_img"].dtype) * 1e-3
        self.out = {name: torch.zeros_like(x[name]) for name in x}  # (N, D) row results per input
        self.forward_products = mode_products(preset, "forward")
        self.gradient_products = mode_products(preset, "backward")

    def zero_grad(self):
        for out in self.out.values():
            out.zero_()

    def _tiles(self):
        n = self.x["s_img"].shape[0]
        for start in range(0, n, self.columns):
            stop = min(start + self.columns, n)
            yield start, stop, self.buffer[: n * (stop - start)].view(n, stop - start)

    def _run(self, products):
        for product in products:
            anchors, candidates = self.x[product.anchor], self.x[product.candidate]
            for start, stop, tile in self._tiles():
                if product.kind in LOGITS_KINDS:  # Z[:, tile] = X @ Y[tile]^T
                    torch.mm(anchors, candidates[start:stop].T, out=tile)
                elif product.kind in ANCHOR_KINDS:  # dX[rows] += G[:, tile] @ Y[tile]
                    self.out[product.anchor].addmm_(tile, candidates[start:stop])
                else:  # dY[tile] = G[:, tile]^T @ X[rows]
                    torch.mm(tile.T, anchors, out=self.out[product.candidate][start:stop])

    def forward(self):
        self._run(self.forward_products)

    def backward(self, _state):
        self._run(self.gradient_products)


def build_case(backend: str, preset: str, inputs: dict[str, torch.Tensor]):
    if backend == "floor":
        return FloorCase(preset, inputs)
    return LossCase(backend, preset, inputs)


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def mode_functions(case, mode: str, device: str):
    """(setup, target) for ``benchmark.pedantic``: setup is untimed and returns (args, kwargs) for target; target
    returns the loss total it computed or backpropagated (None for the floor)."""
    if mode == "forward":
        def setup():
            case.zero_grad()
            _sync(device)
            return (), {}

        def target():
            total = case.forward()
            _sync(device)
            return total
    elif mode == "backward":
        def setup():
            case.zero_grad()
            state = case.forward()
            _sync(device)
            return (state,), {}

        def target(state):
            case.backward(state)
            _sync(device)
            return state
    elif mode == "forward+backward":
        def setup():
            case.zero_grad()
            _sync(device)
            return (), {}

        def target():
            total = case.forward()
            case.backward(total)
            _sync(device)
            return total
    else:
        raise ValueError(f"mode: unknown mode {mode!r}")
    return setup, target


def run_once(case, mode: str, device: str) -> tuple[float, float | None]:
    """Run a mode once (setup untimed); return (seconds its timed part took, the loss total or None)."""
    setup, target = mode_functions(case, mode, device)
    args, kwargs = setup()
    start = time.perf_counter()
    total = target(*args, **kwargs)
    seconds = time.perf_counter() - start
    return seconds, None if total is None else float(total.detach())


class ValueLedger:
    """Loss values of the cases run so far, per (weight set, N): each new one must match the reference's (or the
    chunked backend's, where the reference did not run) within the dtype's relative tolerance."""

    RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 1e-2}
    TRUTH = ("reference", "chunked")  # in order of preference

    def __init__(self):
        self.values: dict[tuple, dict[str, float]] = {}

    def check(self, backend: str, preset: str, n: int, value: float | None, dtype: torch.dtype) -> dict:
        """Record ``value``; raise AssertionError on a mismatch; return what was compared (for extra_info)."""
        if value is None:  # the floor computes no loss
            return {"value_check": "none (no loss)"}
        seen = self.values.setdefault((preset, n), {})
        seen[backend] = value
        truth_backend = next((b for b in self.TRUTH if b in seen and b != backend), None)
        if truth_backend is None:
            return {"value": value, "value_check": "first value at this size (nothing to compare with yet)"}
        truth = seen[truth_backend]
        error = abs(value - truth) / max(abs(truth), 1e-12)
        rtol = self.RTOL[dtype]
        assert math.isfinite(value) and error <= rtol, (
            f"{backend} loss {value!r} differs from {truth_backend}'s {truth!r} at {preset} N={n} "
            f"(relative error {error:.2e} > {rtol:.0e})")
        return {"value": value, "value_check": f"{truth_backend} (relative error {error:.1e})", "value_error": error}


def rounds_for(seconds_per_call: float, case_seconds: float, max_rounds: int) -> int:
    """As many rounds as fit in ``case_seconds`` (at least 1, at most ``max_rounds``)."""
    if seconds_per_call <= 0 or case_seconds <= 0:
        return 1
    return max(1, min(max_rounds, math.floor(case_seconds / seconds_per_call)))
