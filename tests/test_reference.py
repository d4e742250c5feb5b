"""The reference objective against ground truth nobody here wrote: hand computation, open_clip, autograd."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, DistillClipLoss

from kernels import clip_rd_loss
from kernels.reference import contrastive_gradients
from tests.helpers import assert_close, make_inputs


def test_task_by_hand():
    """N = 2, D = 2 orthonormal embeddings: every logit is 0 or the scale, so CE = log(1 + e^-s) per row."""
    eye = torch.eye(2)
    other = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = clip_rd_loss(eye, eye, other, other, student_scale=3.0, weights="baseline", backend="reference")
    assert out["task"].item() == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-6)
    # icl: anchors S_I against T_T (swapped axes): the positive logit is 0, the negative kappa.
    out = clip_rd_loss(eye, eye, other, other, student_scale=3.0, kappa=2.0, weights={"task": 0, "icl": 1},
                       backend="reference")
    assert out["icl"].item() == pytest.approx(math.log(1 + math.exp(2.0)), rel=1e-6)


def test_kd_by_hand():
    """hrd with N = 2: a closed-form KL between two 2-way softmaxes."""
    s_img = torch.eye(2)
    s_txt = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=1)
    t = torch.eye(2)
    out = clip_rd_loss(s_img, s_txt, t, t, student_scale=2.0, teacher_scale=5.0, weights={"task": 0, "hrd": 1},
                       backend="reference")

    def kl(p_logits, q_logits):
        p, q = torch.softmax(p_logits, 0), torch.softmax(q_logits, 0)
        return (p * (p / q).log()).sum()

    a = 2.0 * s_img @ s_txt.T
    g = 5.0 * t @ t.T
    expected = 0.5 * (sum(kl(g[i], a[i]) for i in range(2)) / 2 + sum(kl(g.T[i], a.T[i]) for i in range(2)) / 2)
    assert out["hrd"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("n,d", [(3, 8), (37, 24), (129, 64)])
def test_task_equals_open_clip_clip_loss(n, d):
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(n, d, torch.float64)
    ours = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=scalars["student_scale"], weights="baseline",
                        backend="reference")["task"]
    theirs = ClipLoss()(s_img, s_txt, scalars["student_scale"])
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    g_ours = torch.autograd.grad(ours, (s_img, s_txt))
    g_theirs = torch.autograd.grad(theirs, (s_img, s_txt))
    for a, b in zip(g_ours, g_theirs):
        assert_close(a, b, 1e-10, "task gradient")


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_hrd_gradient_equals_open_clip_distill_loss(backend):
    """DistillClipLoss's distill term is CE with soft targets = hrd + teacher entropy: same gradient."""
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(37, 24, torch.float64)
    scale = scalars["student_scale"]
    ours = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=scale, teacher_scale=40.0,
                        weights={"task": 0, "hrd": 1}, backend=backend)["total"]
    _, theirs = DistillClipLoss()(s_img, s_txt, scale, t_img, t_txt, torch.tensor(40.0, dtype=torch.float64))
    g_ours = torch.autograd.grad(ours, (s_img, s_txt, scale))
    g_theirs = torch.autograd.grad(theirs, (s_img, s_txt, scale))
    tol = 1e-10 if backend == "reference" else 1e-5  # chunked computes in fp32
    for name, a, b in zip(("s_img", "s_txt", "scale"), g_ours, g_theirs):
        assert_close(a.double(), b, tol, f"hrd gradient {name}")
    teacher_logits = 40.0 * t_img @ t_txt.T
    entropy = 0.5 * sum(
        -(torch.softmax(m, 1) * torch.log_softmax(m, 1)).sum(1).mean() for m in (teacher_logits, teacher_logits.T)
    )
    assert (theirs - ours).item() == pytest.approx(entropy.item(), rel=1e-5)


def test_contrastive_gradients_equal_autograd():
    """gd's closed form gX = s R Y / B, gY = s R^T X / B is the gradient of the mean CE."""
    (x, y, _, _), _ = make_inputs(37, 24, torch.float64)
    for row_start, row_stop in ((0, 37), (4, 21)):
        gx, gy = contrastive_gradients(x, y, 7.0, row_start, row_stop)
        logits = 7.0 * x[row_start:row_stop] @ y.T
        ce = F.cross_entropy(logits, torch.arange(row_start, row_stop))
        ax, ay = torch.autograd.grad(ce, (x, y))
        assert_close(gx, ax[row_start:row_stop], 1e-12, "gX")
        assert_close(gy, ay, 1e-12, "gY")


def test_intra_equals_kl_without_the_self_column():
    """Masking the self pair with -inf equals dropping that column from both softmaxes."""
    (s_img, s_txt, t_img, t_txt), _ = make_inputs(9, 8, torch.float64)
    out = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=5.0, teacher_scale=20.0,
                       weights={"task": 0, "intra": 1}, backend="reference")
    off_diagonal = ~torch.eye(9, dtype=torch.bool)

    def kd_without_self(student, teacher, s, t):
        a = (s * student @ student.T)[off_diagonal].view(9, 8)
        g = (t * teacher @ teacher.T)[off_diagonal].view(9, 8)
        return F.kl_div(F.log_softmax(a, 1), F.log_softmax(g, 1), log_target=True, reduction="batchmean")

    expected = 0.5 * (kd_without_self(s_img, t_img, 5.0, 20.0) + kd_without_self(s_txt, t_txt, 5.0, 20.0))
    assert out["intra"].item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_local_loss_shards_recompose_the_whole_batch(backend):
    """Equal row shares: mean of per-rank losses = whole-batch loss; summed rank gradients / ranks = whole gradient."""
    weights = {"task": 1, "fd": 3, "icl": 1, "hrd": 1, "vrd": 1, "xrd": 1, "intra": 1}
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(36, 16, torch.float64)
    kwargs = dict(teacher_scale=30.0, weights=weights, backend=backend, **scalars)
    whole = clip_rd_loss(s_img, s_txt, t_img, t_txt, **kwargs)["total"]
    g_whole = torch.autograd.grad(whole, (s_img, s_txt, *scalars.values()))
    shards = [clip_rd_loss(s_img, s_txt, t_img, t_txt, row_start=r, row_stop=r + 12, **kwargs)["total"]
              for r in (0, 12, 24)]
    mean = sum(shards) / 3
    assert mean.item() == pytest.approx(whole.item(), rel=1e-6)
    g_mean = torch.autograd.grad(mean, (s_img, s_txt, *scalars.values()))
    for a, b in zip(g_mean, g_whole):
        assert_close(a, b, 1e-5, "local-loss gradient")


def test_teacher_never_receives_gradient():
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(5, 8)
    t_img.requires_grad_(True)
    out = clip_rd_loss(s_img, s_txt, t_img, t_txt, teacher_scale=10.0, weights="intra-kd", backend="reference",
                       **scalars)
    out["total"].backward()
    assert t_img.grad is None
