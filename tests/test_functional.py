"""The public contract: dispatch, term keys, the module, and clear errors for bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import PRESETS, ClipRDLoss, clip_rd_loss
from tests.helpers import assert_close, make_inputs


def _inputs(n=6, d=8):
    (s_img, s_txt, t_img, t_txt), _ = make_inputs(n, d)
    return s_img, s_txt, t_img, t_txt


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_keys_follow_weights(preset):
    out = clip_rd_loss(*_inputs(), student_scale=10.0, teacher_scale=20.0, weights=preset, backend="chunked")
    expected = {"total", *[k for k, w in PRESETS[preset].items() if w]}
    if "vrd" in expected:
        expected |= {"vrd_ce_img", "vrd_ce_txt"}
    assert set(out) == expected
    total = sum(PRESETS[preset].get("vrd" if k.startswith("vrd") else k, 0) * v for k, v in out.items() if k != "total")
    assert out["total"].item() == pytest.approx(total.item(), rel=1e-5)


def test_auto_is_chunked_on_cpu():
    x = _inputs()
    auto = clip_rd_loss(*x, student_scale=10.0, teacher_scale=20.0, backend="auto")
    chunked = clip_rd_loss(*x, student_scale=10.0, teacher_scale=20.0, backend="chunked")
    assert auto["total"].item() == chunked["total"].item()


def test_zero_weight_term_is_absent_and_task_defaults_to_one():
    out = clip_rd_loss(*_inputs(), student_scale=10.0, weights={"icl": 1.0}, backend="reference")
    assert set(out) == {"total", "task", "icl"}
    out = clip_rd_loss(*_inputs(), student_scale=10.0, weights={"task": 0.0}, backend="chunked")
    assert set(out) == {"total"} and out["total"].item() == 0.0


def test_module_matches_functional_and_owns_multipliers():
    s_img, s_txt, t_img, t_txt = _inputs()
    loss = ClipRDLoss("clip-rd", backend="reference")
    assert loss.lam_img.item() == pytest.approx(math.log(1 / 0.07))
    out = loss(s_img * 3.0, s_txt * 0.5, torch.tensor(10.0), t_img * 2.0, t_txt, torch.tensor(20.0))
    ref = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=10.0, teacher_scale=20.0, backend="reference")
    assert out["total"].item() == pytest.approx(ref["total"].item(), rel=1e-5)  # inputs are normalised
    out["total"].backward()
    assert all(p.grad is not None for p in (loss.lam_img, loss.lam_txt, loss.kappa))


def test_module_exp_multipliers():
    loss = ClipRDLoss({"vrd": 1.0}, exp_multipliers=True, init_multiplier=5.0, backend="chunked")
    assert loss.lam_img.item() == pytest.approx(math.log(5.0))
    s_img, s_txt, t_img, t_txt = _inputs()
    out = loss(s_img, s_txt, torch.tensor(10.0), t_img, t_txt, torch.tensor(20.0))
    ref = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=10.0, lam_img=5.0, lam_txt=5.0, kappa=5.0,
                       weights={"vrd": 1.0}, backend="reference")
    assert out["total"].item() == pytest.approx(ref["total"].item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_module_projects_student_to_teacher_width(backend):
    torch.manual_seed(0)
    s_img, s_txt = torch.randn(7, 6, requires_grad=True), torch.randn(7, 6, requires_grad=True)
    t_img, t_txt = F.normalize(torch.randn(7, 10), dim=1), F.normalize(torch.randn(7, 10), dim=1)
    loss = ClipRDLoss("clip-rd", student_dim=6, teacher_dim=10, backend=backend)
    out = loss(s_img, s_txt, torch.tensor(10.0), t_img, t_txt, torch.tensor(20.0))
    # The task term sees the student's own embeddings; every teacher term the projected ones.
    own = clip_rd_loss(F.normalize(s_img, dim=1), F.normalize(s_txt, dim=1), F.normalize(s_img, dim=1),
                       F.normalize(s_txt, dim=1), student_scale=10.0, weights="baseline", backend="reference")
    p_img = F.normalize(loss.image_projection(s_img), dim=1)
    p_txt = F.normalize(loss.text_projection(s_txt), dim=1)
    rest = clip_rd_loss(p_img, p_txt, t_img, t_txt, student_scale=10.0, teacher_scale=20.0,
                        weights=dict(PRESETS["clip-rd"], task=0.0), backend="reference")
    assert out["task"].item() == pytest.approx(own["task"].item(), rel=1e-5)
    assert out["hrd"].item() == pytest.approx(rest["hrd"].item(), rel=1e-5)
    assert out["total"].item() == pytest.approx(own["total"].item() + rest["total"].item(), rel=1e-5)
    out["total"].backward()
    assert loss.image_projection.weight.grad.abs().sum() > 0 and s_img.grad.abs().sum() > 0


def test_chunked_terms_are_detached_logging_values():
    s_img, s_txt, t_img, t_txt = _inputs()
    out = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=10.0, teacher_scale=20.0, backend="chunked")
    assert out["total"].requires_grad and not out["hrd"].requires_grad


def test_no_grad_evaluation_matches():
    x = _inputs()
    with torch.no_grad():
        a = clip_rd_loss(*x, student_scale=10.0, teacher_scale=20.0, weights="intra-kd", backend="chunked")
    b = clip_rd_loss(*x, student_scale=10.0, teacher_scale=20.0, weights="intra-kd", backend="reference")
    for key in b:
        assert_close(a[key], b[key].detach(), 1e-5, key, floor=1.0)


# ---- bad input --------------------------------------------------------------------------------------------------

def _call(*args, **kwargs):
    params = dict(student_scale=10.0, teacher_scale=20.0, backend="chunked")
    params.update(kwargs)
    return clip_rd_loss(*args, **params)


BAD_CASES = [
    ("3-D input", lambda x: _call(x[0][None], *x[1:]), ValueError, "s_img: expected a 2-D"),
    ("rows differ", lambda x: _call(x[0], x[1][:5], *x[2:]), ValueError, "s_txt: shape"),
    ("width differs", lambda x: _call(*x[:2], torch.randn(6, 9), x[3]), ValueError, "t_img: shape"),
    ("integer dtype", lambda x: _call(x[0], x[1], x[2].long(), x[3]), TypeError, "t_img: expected a floating"),
    ("student dtypes differ", lambda x: _call(x[0], x[1].double(), *x[2:]), TypeError, "s_txt: dtype"),
    ("not a tensor", lambda x: _call(x[0].tolist(), *x[1:]), TypeError, "s_img: expected a torch.Tensor"),
    ("meta device", lambda x: _call(*x[:3], x[3].to("meta")), ValueError, "t_txt: on device"),
    ("unknown backend", lambda x: _call(*x, backend="cuda"), ValueError, "backend: unknown backend"),
    ("unknown preset", lambda x: _call(*x, weights="clip-xx"), ValueError, "unknown preset"),
    ("unknown weight key", lambda x: _call(*x, weights={"crd": 1.0}), ValueError, "unknown key"),
    ("NaN weight", lambda x: _call(*x, weights={"hrd": float("nan")}), ValueError, "must be finite"),
    ("empty row range", lambda x: _call(*x, row_start=3, row_stop=3), ValueError, "empty or out-of-range"),
    ("row range past N", lambda x: _call(*x, row_start=0, row_stop=7), ValueError, "empty or out-of-range"),
    ("float row index", lambda x: _call(*x, row_start=1.0), TypeError, "row_start"),
    ("vector scale", lambda x: _call(*x, student_scale=torch.ones(2)), ValueError, "student_scale: expected a scalar"),
    ("string scale", lambda x: _call(*x, kappa="2"), TypeError, "kappa: expected a float"),
    ("missing teacher scale", lambda x: _call(*x, teacher_scale=None), ValueError, "teacher_scale: required"),
    ("intra with N=1", lambda x: _call(*[e[:1] for e in x], weights="intra-kd"), ValueError, "N >= 2"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_clear_error(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call(_inputs())


def test_module_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ClipRDLoss(backend="fast")
