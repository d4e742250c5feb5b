"""Teacher ensembles for the softmax terms (kernels/README.md, "Teacher ensembles"): the reference against hand
computations and single-teacher calls, the chunked and Triton backends against the fp64 reference for both modes
(teachers of other widths than the student's, local rows, half dtypes), NaN rows, one-line refusals, ClipRDLoss's
projections per teacher, and two gloo ranks. Triton runs under TRITON_INTERPRET=1 on small sizes."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels interpreted

import math

import pytest
import torch
import torch.nn.functional as F

import kernels.triton_fused as triton_fused
from kernels import ClipRDLoss, clip_rd_loss, resolve_weights, spec
from kernels.functional import triton_unsupported
from kernels.reference import kd_average_after_softmax
from tests.helpers import (
    SMALL_BLOCKS,
    SMALL_TILES,
    assert_close,
    compare_with_reference,
    run_ranks,
    run_teacher_lists,
    teacher_list_inputs,
)

AFTER, LOSSES = spec.AVERAGE_AFTER_SOFTMAX, spec.AVERAGE_LOSSES
# Two teachers of their own widths, other than the student's (MobileCLIP distils from two), at their own scales.
WIDTHS = (12, 20)
TEACHER_SCALES = [20.0, 35.0, 28.0]
SCALARS = {"student_scale": 14.3, "lam_img": 2.66, "lam_txt": 3.1, "kappa": 2.2}
GRADS = ("s_img", "s_txt", *SCALARS)
# The terms an ensemble feeds in either mode (teachers of any width), and every teacher term (average-losses only,
# every teacher of the student's width).
LOGIT_TERMS = {"task": 1.0, "hrd": 1.0, "intra": 0.5}
EVERY_TERM = {"task": 1.0, "fd": 3.0, "icl": 1.0, "hrd": 1.0, "vrd": 1.0, "xrd": 1.0, "intra": 0.5, "cross_kd": 1.0,
              "gd": 2.0}


def make_inputs(n: int, d: int, widths=WIDTHS, seed: int = 0) -> dict:
    """fp64 student (n, d) embeddings and a teacher per width, sharing the student's component (teachers agree)."""
    return teacher_list_inputs(n, d, widths, seed, share_student=True)


def run(backend: str, inputs: dict, dtype=torch.float64, weights=LOGIT_TERMS, ensemble=AFTER, grad_output=1.0,
        **kwargs):
    """Term values and the gradients of GRADS, with the embeddings rounded to ``dtype`` (fp64 for the reference)."""
    kwargs.setdefault("teacher_scale", TEACHER_SCALES[:len(inputs["t_img"])])
    return run_teacher_lists(backend, inputs, dtype, SCALARS, GRADS, grad_output, weights=weights, ensemble=ensemble,
                             **kwargs)


def compare(backend: str, inputs: dict, dtype, **kwargs):
    """Values and gradients of ``backend`` on ``dtype`` inputs against the fp64 reference on the same rounded inputs."""
    compare_with_reference(run, backend, inputs, dtype, GRADS, **kwargs)


# ---- the reference against hand computations ----------------------------------------------------------------------


def test_average_after_softmax_by_hand():
    """hrd and intra against KL(pbar || softmax(A)) written with F.kl_div, pbar the mean of the teachers' softmaxes
    (each at its own scale), intra without the self column; and d KD / dA = (softmax(A) - pbar) / rows."""
    x = make_inputs(7, 5, widths=(6, 10))
    s_img, s_txt = x["s_img"], x["s_txt"]
    tau = torch.tensor(SCALARS["student_scale"]).item()  # the fp32 leaf's value
    terms, _ = run("reference", x, weights={"task": 0.0, "hrd": 1.0, "intra": 1.0})

    def kd(a, targets):  # mean over rows of KL(pbar || P(a))
        pbar = sum(torch.softmax(t, 1) for t in targets) / len(targets)
        return F.kl_div(torch.log_softmax(a, 1), pbar, reduction="batchmean")

    off = ~torch.eye(7, dtype=torch.bool)

    def without_self(m):
        return m[off].view(7, 6)

    pairs = list(zip(x["t_img"], x["t_txt"], TEACHER_SCALES))
    hrd = 0.5 * (kd(tau * s_img @ s_txt.T, [t * a @ b.T for a, b, t in pairs])
                 + kd(tau * s_txt @ s_img.T, [t * b @ a.T for a, b, t in pairs]))
    intra = 0.5 * (kd(without_self(tau * s_img @ s_img.T), [without_self(t * a @ a.T) for a, _, t in pairs])
                   + kd(without_self(tau * s_txt @ s_txt.T), [without_self(t * b @ b.T) for _, b, t in pairs]))
    assert terms["hrd"].item() == pytest.approx(hrd.item(), rel=1e-10)
    assert terms["intra"].item() == pytest.approx(intra.item(), rel=1e-10)

    logits = (tau * s_img @ s_txt.T).requires_grad_(True)
    targets = [t * a @ b.T for a, b, t in pairs]
    kd_average_after_softmax(logits, targets).backward()
    pbar = sum(torch.softmax(t, 1) for t in targets) / 2
    assert_close(logits.grad, (torch.softmax(logits.detach(), 1) - pbar) / 7, 1e-12, "d KD / dA")


def test_average_losses_is_the_mean_of_single_teacher_terms():
    """Every teacher term under average-losses, values and gradients, is the mean of the single-teacher calls; the
    student's own term is computed once."""
    x = make_inputs(9, 6, widths=(6, 6))
    terms, grads = run("reference", x, weights=EVERY_TERM, ensemble=LOSSES)
    singles = [run("reference", {**x, "t_img": [x["t_img"][k]], "t_txt": [x["t_txt"][k]]}, weights=EVERY_TERM,
                   teacher_scale=TEACHER_SCALES[k]) for k in range(2)]
    for key in terms:
        assert terms[key].item() == pytest.approx((singles[0][0][key] + singles[1][0][key]).item() / 2, rel=1e-10)
    for key in GRADS:  # the scalars are fp32 leaves: their gradients are rounded to fp32
        assert_close(grads[key], (singles[0][1][key] + singles[1][1][key]) / 2, 1e-6, f"grad {key}")


def test_average_after_softmax_is_below_average_losses_by_the_teachers_divergence():
    """KD(A ; pbar) = mean_k KD(A ; G_k) - JSD: equal gradients, a lower value, and equal values when the teachers
    agree (a teacher twice is that teacher)."""
    x = make_inputs(9, 6)
    after, after_grads = run("reference", x)
    losses, losses_grads = run("reference", x, ensemble=LOSSES)
    for key in ("hrd", "intra"):
        assert 0 < losses[key].item() - after[key].item() < math.log(2)
    for key in GRADS:
        assert_close(after_grads[key], losses_grads[key], 1e-6, f"grad {key}")
    twice = {**x, "t_img": [x["t_img"][0]] * 2, "t_txt": [x["t_txt"][0]] * 2}
    once = {**x, "t_img": [x["t_img"][0]], "t_txt": [x["t_txt"][0]]}
    for backend in ("reference", "chunked"):
        doubled, _ = run(backend, twice, torch.float32, teacher_scale=TEACHER_SCALES[0])
        single, _ = run(backend, once, torch.float32)
        for key in single:
            assert doubled[key].item() == pytest.approx(single[key].item(), rel=1e-5, abs=1e-6), (backend, key)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_a_list_of_one_teacher_is_that_teacher(backend):
    """In either mode; hrd and intra take one teacher of another width too (12 for a student of 8)."""
    x = make_inputs(9, 8, widths=(12,))
    tensor = {"t_img": x["t_img"][0], "t_txt": x["t_txt"][0]}
    want = clip_rd_loss(x["s_img"], x["s_txt"], *tensor.values(), student_scale=10.0, teacher_scale=20.0,
                        weights=LOGIT_TERMS, backend=backend)
    for mode in (AFTER, LOSSES):
        got = clip_rd_loss(x["s_img"], x["s_txt"], x["t_img"], x["t_txt"], student_scale=10.0, teacher_scale=[20.0],
                           weights=LOGIT_TERMS, backend=backend, ensemble=mode)
        for key in want:
            assert got[key].item() == want[key].item(), (mode, key)


# ---- backends against the fp64 reference -------------------------------------------------------------------------

# (dtype, N, rows, weights, mode, widths): both modes with teachers of other widths, every teacher term with three
# teachers of the student's width, local rows, half precision.
CHUNKED_CASES = [
    (torch.float32, 33, (0, 33), LOGIT_TERMS, AFTER, WIDTHS),
    (torch.float32, 33, (5, 29), LOGIT_TERMS, LOSSES, WIDTHS),
    (torch.float32, 33, (5, 29), EVERY_TERM, LOSSES, (17, 17, 17)),
    (torch.bfloat16, 33, (5, 29), LOGIT_TERMS, AFTER, WIDTHS),
]
CHUNKED_IDS = ["after-fp32", "losses-fp32-rows", "every-term-3-teachers-rows", "after-bf16-rows"]


@pytest.mark.parametrize("dtype,n,rows,weights,mode,widths", CHUNKED_CASES, ids=CHUNKED_IDS)
def test_chunked_matches_reference(dtype, n, rows, weights, mode, widths):
    compare("chunked", make_inputs(n, 17, widths), dtype, weights=weights, ensemble=mode, row_start=rows[0],
            row_stop=rows[1], **SMALL_BLOCKS)


# Smaller than the chunked cases (the interpreter is slow): N = 21 crosses the 16 x 32 tiles of SMALL_TILES; the
# teacher terms at N = 9: fd, icl, hrd, and vrd for teacher-anchored views (their scale gradients come from the
# column pass), gd (its kernels once per teacher). bf16 takes the interpreter's upcast dot (DOT_FP32).
TRITON_EVERY_TERM = {"task": 1.0, "fd": 3.0, "icl": 1.0, "hrd": 1.0, "vrd": 1.0, "gd": 2.0}
TRITON_CASES = [
    (torch.float32, 21, (3, 20), LOGIT_TERMS, AFTER, WIDTHS),
    (torch.bfloat16, 17, (0, 17), LOGIT_TERMS, AFTER, WIDTHS),
    (torch.float16, 9, (2, 8), TRITON_EVERY_TERM, LOSSES, (9, 9)),
]
TRITON_IDS = ["after-fp32-rows", "after-bf16", "every-term-fp16-rows"]


@pytest.mark.parametrize("dtype,n,rows,weights,mode,widths", TRITON_CASES, ids=TRITON_IDS)
def test_triton_matches_reference(dtype, n, rows, weights, mode, widths):
    """Teachers wider than the student are stacked zero-padded to the widest width; the students' gradients come
    back at their own."""
    compare("triton", make_inputs(n, 9, widths), dtype, weights=weights, ensemble=mode, row_start=rows[0],
            row_stop=rows[1], grad_output=-1.5, tiles=SMALL_TILES)


def test_triton_plan_reads_each_teacher_where_the_forward_saved_it():
    """hrd over two teachers: one pair per (direction, teacher), the student view in both; the ensemble kernel's
    member table names each teacher's slabs, scale and saved lse row."""
    weights = resolve_weights({"task": 0.0, "hrd": 1.0})
    plan = triton_fused._plan(tuple(sorted(weights.items())), torch.device("cpu"), 2, AFTER)
    assert plan.table.shape[0] == 4 and plan.members.shape == (2, 2, 5)
    assert plan.scales[-2:] == ("teacher1", "gd_teacher1")
    # image anchors: teacher 0 is slabs (2, 3) at scale "teacher", teacher 1 slabs (4, 5) at "teacher1"
    assert plan.members[0, :, :3].tolist() == [[2, 3, 1], [4, 5, plan.scales.index("teacher1")]]
    assert triton_fused._plan(tuple(sorted(weights.items())), torch.device("cpu"), 2, LOSSES).members.numel() == 0


# ---- the contract ------------------------------------------------------------------------------------------------


# Triton under average-losses is the single-teacher kernels' pairs: the ensemble's value kernel is what is new.
NAN_CASES = [("reference", AFTER), ("reference", LOSSES), ("chunked", AFTER), ("chunked", LOSSES), ("triton", AFTER)]


@pytest.mark.parametrize("backend,mode", NAN_CASES)
def test_a_nan_teacher_row_never_gives_a_finite_loss(backend, mode):
    x = make_inputs(5, 4, widths=(6, 8))
    x["t_txt"][1][2] = float("nan")
    terms, _ = run(backend, x, torch.float32, ensemble=mode)
    for key in ("total", "hrd", "intra"):
        assert not math.isfinite(terms[key].item()), f"{backend}: {key} finite from a NaN teacher row"
    assert math.isfinite(terms["task"].item())


def _call(**changes):
    x = make_inputs(6, 8)
    args = dict(s_img=x["s_img"], s_txt=x["s_txt"], t_img=x["t_img"], t_txt=x["t_txt"], student_scale=10.0,
                teacher_scale=TEACHER_SCALES[:2], weights=LOGIT_TERMS, backend="chunked")
    args.update(changes)
    return clip_rd_loss(args.pop("s_img"), args.pop("s_txt"), args.pop("t_img"), args.pop("t_txt"), **args)


BAD_CASES = [
    ("unknown mode", dict(ensemble="average"), r"ensemble: unknown mode 'average'; expected one of"),
    ("lists differ", dict(t_txt=[torch.randn(6, 12)]), r"t_txt: 1 teacher\(s\) but t_img has 2"),
    ("scales per teacher", dict(teacher_scale=[1.0, 2.0, 3.0]), r"teacher_scale: 3 value\(s\) for 2 teacher"),
    ("embedding term after softmax", dict(weights={"icl": 1.0, "hrd": 1.0}),
     r"ensemble='average-after-softmax': weights \['icl'\] put teacher and student embeddings side by side.*"
     r"pass ensemble='average-losses'"),
    ("embedding term at another width", dict(weights={"fd": 1.0}, ensemble=LOSSES),
     r"t_img\[0\]: shape \(6, 12\) does not match s_img \(6, 8\); weights \['fd'\] compare teacher and student"),
    ("member widths differ", dict(t_txt=[torch.randn(6, 12).double(), torch.randn(6, 12).double()]),
     r"t_txt\[1\]: width 12 does not match t_img\[1\] width 20"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_refused_in_one_line(case):
    _, changes, message = case
    with pytest.raises(ValueError, match=message) as refused:
        _call(**changes)
    assert "\n" not in str(refused.value)


MODULE_BAD_CASES = [
    ("afd", lambda: ClipRDLoss({"afd": 1.0}, student_dim=8, teacher_dim=[12, 20], ensemble=LOSSES),
     r"weights\['afd'\]: afd fuses the student with one teacher"),
    ("embedding term after softmax", lambda: ClipRDLoss("clip-kd", student_dim=8, teacher_dim=[12, 20]),
     r"ensemble='average-after-softmax': weights \['fd', 'icl'\]"),
    ("unknown mode", lambda: ClipRDLoss(LOGIT_TERMS, ensemble="after"), "ensemble: unknown mode 'after'"),
    ("teacher count", lambda: ClipRDLoss(LOGIT_TERMS, student_dim=8, teacher_dim=[12, 20, 4])(
        torch.randn(6, 8), torch.randn(6, 8), torch.tensor(10.0), [torch.randn(6, 12)] * 2, [torch.randn(6, 12)] * 2,
        [20.0, 30.0]), r"dist_image_features: 2 teacher\(s\) but the loss was built for 3"),
]


@pytest.mark.parametrize("case", MODULE_BAD_CASES, ids=[c[0] for c in MODULE_BAD_CASES])
def test_module_refuses_in_one_line(case):
    _, call, message = case
    with pytest.raises(ValueError, match=message) as refused:
        call()
    assert "\n" not in str(refused.value)


def test_auto_leaves_triton_for_a_teacher_wider_than_the_kernels():
    wide = spec.Teacher(torch.zeros(3, 4096), torch.zeros(3, 4096), torch.tensor(1.0), torch.tensor(1.0))
    narrow = spec.Teacher(torch.zeros(3, 8), torch.zeros(3, 8), torch.tensor(1.0), torch.tensor(1.0))
    reason = triton_unsupported(resolve_weights(LOGIT_TERMS), torch.zeros(3, 8), None, (narrow, wide))
    assert "width 4096 exceeds the Triton kernels' maximum" in reason
    assert triton_unsupported(resolve_weights(LOGIT_TERMS), torch.zeros(3, 8), None, (narrow, narrow)) is None


def test_module_after_softmax_reads_the_students_own_embeddings():
    """No projection: hrd and intra compare logits, the student's own against the teachers' averaged softmaxes."""
    torch.manual_seed(0)
    image, text = torch.randn(7, 6), torch.randn(7, 6)
    teachers = [torch.randn(7, 12), torch.randn(7, 20)], [torch.randn(7, 12), torch.randn(7, 20)]
    loss = ClipRDLoss(LOGIT_TERMS, student_dim=6, teacher_dim=list(WIDTHS), backend="reference")
    assert loss.image_projections is None and loss.image_projection is None
    out = loss(image, text, torch.tensor(10.0), *teachers, TEACHER_SCALES[:2])
    want = clip_rd_loss(F.normalize(image, dim=1), F.normalize(text, dim=1),
                        *([F.normalize(t, dim=1) for t in side] for side in teachers), student_scale=10.0,
                        teacher_scale=TEACHER_SCALES[:2], weights=LOGIT_TERMS, backend="reference")
    for key in want:
        assert out[key].item() == pytest.approx(want[key].item(), rel=1e-6)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_module_average_losses_projects_the_student_per_teacher(backend):
    """Average-losses: teacher k's terms with the student projected to its width by a pair of its own (identity for
    the teacher of the student's width), averaged; the task term once on the student's own embeddings."""
    torch.manual_seed(0)
    image, text = torch.randn(7, 6, requires_grad=True), torch.randn(7, 6, requires_grad=True)
    widths = (6, 10)
    teachers = [torch.randn(7, w) for w in widths], [torch.randn(7, w) for w in widths]
    weights = dict(EVERY_TERM, gd=0.0)
    loss = ClipRDLoss(weights, student_dim=6, teacher_dim=list(widths), backend=backend, ensemble=LOSSES)
    assert isinstance(loss.image_projections[0], torch.nn.Identity) and loss.image_projections[1].out_features == 10
    out = loss(image, text, torch.tensor(10.0), *teachers, TEACHER_SCALES[:2])
    scalars = dict(lam_img=loss.lam_img, lam_txt=loss.lam_txt, kappa=loss.kappa, backend="reference")
    own = clip_rd_loss(F.normalize(image, dim=1), F.normalize(text, dim=1), F.normalize(image, dim=1),
                       F.normalize(text, dim=1), student_scale=10.0, weights="baseline", **scalars)
    singles = []
    for k in range(2):
        p_img = F.normalize(loss.image_projections[k](image), dim=1)
        p_txt = F.normalize(loss.text_projections[k](text), dim=1)
        singles.append(clip_rd_loss(p_img, p_txt, F.normalize(teachers[0][k], dim=1),
                                    F.normalize(teachers[1][k], dim=1), student_scale=10.0,
                                    teacher_scale=TEACHER_SCALES[k], weights=dict(weights, task=0.0), **scalars))
    assert out["task"].item() == pytest.approx(own["task"].item(), rel=1e-5)
    for key in singles[0]:
        if key != "total":
            assert out[key].item() == pytest.approx((singles[0][key] + singles[1][key]).item() / 2, rel=1e-5), key
    want = own["total"] + (singles[0]["total"] + singles[1]["total"]) / 2
    assert out["total"].item() == pytest.approx(want.item(), rel=1e-5)
    out["total"].backward()
    assert loss.image_projections[1].weight.grad.abs().sum() > 0 and loss.kappa.grad is not None


# ---- two gloo ranks ---------------------------------------------------------------------------------------------

WORLD, LOCAL_ROWS, WIDTH = 2, 5, 8
# Average-after-softmax with teachers of other widths; average-losses with gd, exact across ranks under the group.
DISTRIBUTED = {"after": (LOGIT_TERMS, AFTER, WIDTHS), "losses": ({"task": 1.0, "icl": 1.0, "hrd": 1.0, "gd": 3.0},
                                                                  LOSSES, (WIDTH, WIDTH))}
# Triton on the new path only (its gd under a group: tests/test_triton.py; an ensemble's gd is one call per teacher).
DISTRIBUTED_RUNS = [(case, backend) for case in DISTRIBUTED for backend in ("reference", "chunked", "triton")
                    if backend != "triton" or case == "after"]


def _student():
    """A linear tower per modality and the student's learnable logit scale."""
    from torch import nn

    torch.manual_seed(0)
    student = nn.Module()
    student.image, student.text = nn.Linear(WIDTH, WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
    student.logit_scale = nn.Parameter(torch.tensor(2.5))
    return student


def _loss(student, batch, case, backend, gather=lambda x: x, row_start=0, row_stop=None, group=None):
    weights, mode, widths = DISTRIBUTED[case]
    images, texts, t_img, t_txt = batch
    s_img = gather(F.normalize(student.image(images), dim=1))
    s_txt = gather(F.normalize(student.text(texts), dim=1))
    return clip_rd_loss(s_img, s_txt, t_img[case], t_txt[case], student_scale=student.logit_scale.exp(),
                        teacher_scale=TEACHER_SCALES[:2], weights=weights, ensemble=mode, row_start=row_start,
                        row_stop=row_stop, group=group, backend=backend)["total"]


def _global_batch():
    x = {case: make_inputs(WORLD * LOCAL_ROWS, WIDTH, widths, seed=3) for case, (_, _, widths) in DISTRIBUTED.items()}
    images, texts = x["after"]["s_img"].float(), x["after"]["s_txt"].float()
    return images, texts, *({case: [t.float() for t in x[case][side]] for case in x} for side in ("t_img", "t_txt"))


def _rank(rank, port, queue):
    """Local loss with gather-with-grad: this rank's rows against every gathered column, gd's sums over the group;
    gradients averaged over the ranks as DDP does. Returns (loss, gradients) per case and backend."""
    import torch.distributed as dist
    import torch.distributed.nn

    torch.set_num_threads(1)  # first: a forked process must not enter the parent's OpenMP thread pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images, texts, t_img, t_txt = _global_batch()
        rows = slice(rank * LOCAL_ROWS, (rank + 1) * LOCAL_ROWS)
        results = {}
        for case, backend in DISTRIBUTED_RUNS:
            student = _student()
            loss = _loss(student, (images[rows], texts[rows], t_img, t_txt), case, backend,
                         lambda x: torch.cat(torch.distributed.nn.all_gather(x)), rows.start, rows.stop,
                         dist.group.WORLD)
            loss.backward()
            grads = [p.grad for p in student.parameters()]
            for tensor in [loss.detach(), *grads]:
                dist.all_reduce(tensor)
                tensor /= WORLD
            results[case, backend] = [loss.item(), [g.numpy().copy() for g in grads]]
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_local_loss_equals_the_whole_batch():
    results = run_ranks(_rank, WORLD, start="fork")  # CPU tensors, each rank single-threaded

    batch = _global_batch()
    for case, backend in DISTRIBUTED_RUNS:
        student = _student()
        whole = _loss(student, batch, case, backend)
        whole.backward()
        for rank in range(WORLD):
            loss, grads = results[rank][case, backend]
            assert loss == pytest.approx(whole.item(), rel=1e-5), (case, backend)
            for got, param in zip(grads, student.parameters()):
                torch.testing.assert_close(torch.from_numpy(got), param.grad, rtol=1e-4, atol=1e-6)
