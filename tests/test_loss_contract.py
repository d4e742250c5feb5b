"""The loss contract beyond agreement: non-finite inputs, mixed dtypes, double backward, no_grad, afd, gd conventions.

Hand transcriptions here follow the definitions in kernels/README.md directly (no code shared with the backends).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the interpreter

import math

import pytest
import torch
import torch.nn.functional as F

import kernels.chunked as chunked
from kernels import PRESETS, ClipRDLoss, clip_rd_loss
from tests.helpers import make_inputs

BACKENDS = ["reference", "chunked", "triton"]
MIXED = {**PRESETS["intra-kd"], "vrd": 1.0, "xrd": 1.0, "cross_kd": 1.0}


def _loss(backend, embeddings, scalars, weights=MIXED, **kwargs):
    return clip_rd_loss(*embeddings, teacher_scale=40.0, weights=weights, backend=backend, **scalars, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["teacher", "student"])
def test_a_nan_row_never_gives_a_finite_loss(backend, where):
    """A NaN teacher row used to vanish from the reference's KD terms (it kept only p_target > 0)."""
    embeddings, scalars = make_inputs(9, 8)
    embeddings = [e.detach().clone().requires_grad_(e.requires_grad) for e in embeddings]
    with torch.no_grad():
        embeddings[2 if where == "teacher" else 0][4] = float("nan")
    terms = _loss(backend, embeddings, scalars)
    poisoned = ["total", "hrd", "intra", "cross_kd", "icl", "xrd"] + (["task"] if where == "student" else [])
    for term in poisoned:
        assert not math.isfinite(terms[term].item()), f"{backend}: {term} = {terms[term].item()} from a NaN {where} row"


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_mixed_dtypes_computed_in_the_widest(backend):
    """An fp64 student with an fp32 teacher: both backends promote to fp64 alike and agree."""
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(17, 8, torch.float64)
    t_img, t_txt = t_img.float(), t_txt.float()
    weights = {**MIXED, "gd": 1.0}
    got = _loss(backend, (s_img, s_txt, t_img, t_txt), scalars, weights)
    want = _loss("reference", (s_img, s_txt, t_img.double(), t_txt.double()), scalars, weights)
    for key in want:
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5, abs=1e-6), key


def test_double_backward_works_on_the_reference_and_is_refused_elsewhere():
    embeddings, scalars = make_inputs(7, 8)
    total = _loss("reference", embeddings, scalars)["total"]
    (grad,) = torch.autograd.grad(total, embeddings[0], create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), embeddings[0])
    assert torch.isfinite(second).all() and second.abs().sum() > 0
    for backend in ("chunked", "triton"):
        total = _loss(backend, embeddings, scalars)["total"]
        with pytest.raises(RuntimeError, match=f"double backward .* not supported by the {backend} backend"):
            torch.autograd.grad(total, embeddings[0], create_graph=True)


def test_chunked_does_no_gradient_work_under_no_grad(monkeypatch):
    embeddings, scalars = make_inputs(33, 8)
    weights = {**MIXED, "gd": 1.0}
    with_grad = _loss("chunked", embeddings, scalars, weights)
    seen = []
    original = chunked._forward_and_gradients

    def spy(plan, embeddings, scales, want, *args):
        seen.append(any(want.values()))
        return original(plan, embeddings, scales, want, *args)

    monkeypatch.setattr(chunked, "_forward_and_gradients", spy)
    monkeypatch.setattr(chunked, "_gd_gradients", lambda *a, **k: pytest.fail("gd gradient work under no_grad"))
    with torch.no_grad():
        without = _loss("chunked", embeddings, scalars, weights)
    assert seen == [False]
    for key in with_grad:
        assert without[key].item() == pytest.approx(with_grad[key].item(), rel=1e-6), key


def _published_gd(X, Y, X_t, Y_t, s, s_t):
    """CLIP-KD's get_grad as run: logits X Y^T / s, gradients R Y / (s B), R^T X / (s B); MSE of both sides."""
    def grads(a, b, scale):
        r = torch.softmax(a @ b.T / scale, dim=1) - torch.eye(a.shape[0], dtype=a.dtype)
        return r @ b / (scale * a.shape[0]), r.T @ a / (scale * a.shape[0])

    (gx, gy), (tx, ty) = grads(X, Y, s), grads(X_t, Y_t, s_t)
    return 0.5 * (F.mse_loss(gx, tx.detach()) + F.mse_loss(gy, ty.detach()))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_gd_in_the_published_code_convention(backend):
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(11, 8, torch.float64)
    tau = scalars["student_scale"]
    want = _published_gd(s_img, s_txt, t_img, t_txt, tau, 40.0) + _published_gd(s_txt, s_img, t_txt, t_img, tau, 40.0)
    want_grads = torch.autograd.grad(want, [s_img, tau])
    got = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=tau, teacher_scale=40.0, weights={"task": 0, "gd": 1},
                       backend=backend, gd_convention="clip-kd-code")
    assert got["gd"].item() == pytest.approx(want.item(), rel=1e-5)
    for g, w in zip(torch.autograd.grad(got["total"], [s_img, tau]), want_grads):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
def test_afd_matches_a_hand_transcription(backend):
    """afd = 1/2 [CE(f F_I F_T^T) + CE(f F_T F_I^T)], F_x = normalize(W_x [S_x ; T_x] + b_x), teacher half detached."""
    torch.manual_seed(0)
    n, d = 10, 8
    loss = ClipRDLoss({"task": 0.0, "afd": 1.0}, student_dim=d, teacher_dim=d, backend=backend)
    image, text = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    t_image, t_text = torch.randn(n, d), torch.randn(n, d)
    got = loss(image, text, torch.tensor(10.0), t_image, t_text, torch.tensor(20.0))
    params = [image, text, loss.image_fusion.weight, loss.text_fusion.bias, loss.fusion_scale]
    got_grads = torch.autograd.grad(got["total"], params)

    fi = F.normalize(loss.image_fusion(torch.cat([F.normalize(image, dim=1), F.normalize(t_image, dim=1)], 1)), dim=1)
    ft = F.normalize(loss.text_fusion(torch.cat([F.normalize(text, dim=1), F.normalize(t_text, dim=1)], 1)), dim=1)
    labels = torch.arange(n)
    f = loss.fusion_scale
    want = 0.5 * (F.cross_entropy(f * fi @ ft.T, labels) + F.cross_entropy(f * ft @ fi.T, labels))
    want_grads = torch.autograd.grad(want, params)
    assert got["afd"].item() == pytest.approx(want.item(), rel=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-6)


def test_afd_needs_the_module():
    embeddings, scalars = make_inputs(5, 8)
    with pytest.raises(ValueError, match="afd needs the fusion layers of ClipRDLoss"):
        _loss("reference", embeddings, scalars, {"afd": 1.0})
