"""The sigmoid terms: siglip against open_clip's SigLipLoss, sigmoid_kd against MobileCLIP2's DistillSigLipLoss (as its
published patch to open_clip defines it, transcribed below), and the chunked and Triton backends against the fp64
reference, with teacher ensembles of different widths, local rows and two gloo ranks. Triton runs under
TRITON_INTERPRET=1 on small sizes."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (open_clip imports it too): kernels interpreted

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import kernels.triton_config as triton_config
from kernels import ClipRDLoss, clip_rd_loss
from kernels.functional import triton_unsupported
from kernels.spec import SigmoidTeacher, resolve_weights
from tests.helpers import (
    SMALL_BLOCKS,
    SMALL_TILES,
    assert_close,
    compare_with_reference,
    run_ranks,
    run_teacher_lists,
    teacher_list_inputs,
)

SIGMOID = {"task": 0.0, "siglip": 1.0, "sigmoid_kd": 1.0}
# Two teachers of their own widths (MobileCLIP2 distils from an ensemble), scales and biases as SigLIP trains them.
TEACHER_WIDTHS = (12, 20)
TEACHER_SCALES, TEACHER_BIASES = [20.0, 30.0], [-4.0, -8.0]
GRADS = ("s_img", "s_txt", "student_scale", "student_bias")


def make_inputs(n: int, d: int, widths=TEACHER_WIDTHS, seed: int = 0) -> dict:
    """fp64 student (n, d) embeddings and a teacher per width (teachers of their own, not sharing the student's
    component); the student's scale and bias (fp32 leaves, as a model holds them)."""
    inputs = teacher_list_inputs(n, d, widths, seed, share_student=False)
    inputs["student_scale"] = torch.tensor(14.3)
    inputs["student_bias"] = torch.tensor(-3.0)
    return inputs


def run(backend: str, inputs: dict, dtype=torch.float64, weights=SIGMOID, grad_output: float = 1.0, **kwargs):
    """Term values and the gradients of GRADS, with the embeddings rounded to ``dtype`` (fp64 for the reference);
    one teacher is passed as a tensor, more as a list."""
    n_teachers = len(inputs["t_img"])
    scalars = {k: inputs[k] for k in ("student_scale", "student_bias")}
    return run_teacher_lists(backend, inputs, dtype, scalars, GRADS, grad_output, one_as_tensor=True,
                             teacher_scale=TEACHER_SCALES[:n_teachers], teacher_bias=TEACHER_BIASES[:n_teachers],
                             weights=weights, **kwargs)


def compare(backend: str, inputs: dict, dtype, **kwargs):
    """Values and gradients of ``backend`` on ``dtype`` inputs against the fp64 reference on the same rounded inputs."""
    compare_with_reference(run, backend, inputs, dtype, GRADS, **kwargs)


# ---- ground truth nobody here wrote -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("n,d", [(1, 9), (7, 5), (33, 17)])
def test_siglip_equals_open_clip_siglip_loss(backend, n, d):
    from open_clip.loss import SigLipLoss

    inputs = make_inputs(n, d, widths=(d,))  # an unread teacher: siglip is the student alone
    terms, grads = run(backend, inputs, weights={"task": 0.0, "siglip": 1.0}, **SMALL_BLOCKS)
    leaves = [inputs["s_img"].clone().requires_grad_(True), inputs["s_txt"].clone().requires_grad_(True),
              inputs["student_scale"].clone().requires_grad_(True), inputs["student_bias"].clone().requires_grad_(True)]
    theirs = SigLipLoss()(*leaves)
    assert terms["siglip"].item() == pytest.approx(theirs.item(), rel=1e-6)
    for name, got, want in zip(GRADS, (grads[k] for k in GRADS), torch.autograd.grad(theirs, leaves)):
        assert_close(got, want, 1e-6, f"siglip gradient {name}")


def mobileclip2_distill_siglip(image, text, scale, bias, dist_image, dist_text, dist_scales, dist_biases, dims,
                               average_after_sigmoid):
    """DistillSigLipLoss._loss of MobileCLIP2's open_clip patch (training/open_clip_v2.patch), one rank: the
    ensemble's features are concatenated along D and split by ``dims``; returns (contrastive, distill)."""
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(image.shape[0], dtype=image.dtype) - 1
    if average_after_sigmoid:
        edges = [0, *torch.tensor(dims).cumsum(0).tolist()]
        probabilities = [torch.sigmoid(dist_scales[k] * dist_image[:, edges[k]:edges[k + 1]]
                                       @ dist_text[:, edges[k]:edges[k + 1]].T + dist_biases[k])
                         for k in range(len(dims))]
        dist_labels = 2 * sum(probabilities) / len(dims) - 1
    else:
        dist_labels = 2 * torch.sigmoid(dist_scales * dist_image @ dist_text.T + dist_biases) - 1
    contrastive = -F.logsigmoid(labels * logits).sum(1).mean(0)
    distill = -F.logsigmoid(dist_labels * logits).sum(1).mean(0)
    return contrastive, distill


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("widths", [(12,), TEACHER_WIDTHS], ids=["one-teacher", "ensemble"])
def test_sigmoid_kd_equals_mobileclip2_distill_siglip_loss(backend, widths):
    inputs = make_inputs(33, 17, widths)
    terms, grads = run(backend, inputs, **SMALL_BLOCKS)
    leaves = [inputs["s_img"].clone().requires_grad_(True), inputs["s_txt"].clone().requires_grad_(True),
              inputs["student_scale"].clone().requires_grad_(True), inputs["student_bias"].clone().requires_grad_(True)]
    k = len(widths)
    ensemble = dict(dist_image=torch.cat(inputs["t_img"], dim=1), dist_text=torch.cat(inputs["t_txt"], dim=1),
                    dist_scales=TEACHER_SCALES[:k], dist_biases=TEACHER_BIASES[:k], dims=list(widths))
    if k == 1:
        ensemble.update(dist_scales=TEACHER_SCALES[0], dist_biases=TEACHER_BIASES[0])
    contrastive, distill = mobileclip2_distill_siglip(*leaves, **ensemble, average_after_sigmoid=k > 1)
    assert terms["siglip"].item() == pytest.approx(contrastive.item(), rel=1e-6)
    assert terms["sigmoid_kd"].item() == pytest.approx(distill.item(), rel=1e-6)
    want = torch.autograd.grad(contrastive + distill, leaves)
    for name, got, expected in zip(GRADS, (grads[key] for key in GRADS), want):
        assert_close(got, expected, 1e-6, f"gradient {name}")


def test_sigmoid_kd_gradient_by_hand():
    """d sigmoid_kd / dz = -G sigmoid(-G z) / rows: the bias gradient is its sum, the teacher gets none."""
    inputs = make_inputs(7, 5, widths=(6,))
    t_img = inputs["t_img"][0].clone().requires_grad_(True)
    bias = inputs["student_bias"].clone().requires_grad_(True)
    out = clip_rd_loss(inputs["s_img"], inputs["s_txt"], t_img, inputs["t_txt"][0], student_scale=14.3,
                       student_bias=bias, teacher_scale=20.0, teacher_bias=-4.0, weights={"task": 0.0, "sigmoid_kd": 1},
                       backend="reference")
    out["total"].backward()
    z = 14.3 * inputs["s_img"] @ inputs["s_txt"].T - 3.0
    soft = 2 * torch.sigmoid(20.0 * inputs["t_img"][0] @ inputs["t_txt"][0].T - 4.0) - 1
    assert bias.grad.item() == pytest.approx((-soft * torch.sigmoid(-soft * z)).sum().item() / 7, rel=1e-6)
    assert t_img.grad is None


# ---- backends against the fp64 reference -------------------------------------------------------------------------


# Sizes and dtypes spread over the cases rather than crossed (the interpreter is slow): N = 1, 7 and 33 in fp32,
# the half dtypes at the largest N with local rows.
SHAPES = [(torch.float32, 1, None), (torch.float32, 7, None), (torch.float32, 33, None),
          (torch.bfloat16, 33, (5, 19)), (torch.float16, 33, (5, 19))]
SHAPE_IDS = ["fp32-N1", "fp32-N7", "fp32-N33", "bf16-N33-rows", "fp16-N33-rows"]


@pytest.mark.parametrize("dtype,n,rows", SHAPES, ids=SHAPE_IDS)
def test_chunked_matches_reference(dtype, n, rows):
    row_start, row_stop = rows or (0, None)
    compare("chunked", make_inputs(n, 17), dtype, weights={**SIGMOID, "task": 1.0}, row_start=row_start,
            row_stop=row_stop, **SMALL_BLOCKS)


@pytest.mark.parametrize("dtype,n,rows", SHAPES, ids=SHAPE_IDS)
def test_triton_matches_reference(dtype, n, rows):
    """The GPU tiles of each dtype (fp32: 32 x 32, half: 64 x 64), an odd width and two teachers of other widths."""
    row_start, row_stop = rows or (0, None)
    compare("triton", make_inputs(n, 9), dtype, row_start=row_start, row_stop=row_stop)


@pytest.mark.parametrize("weights,rows", [(SIGMOID, (0, 33)), ({"task": 0.0, "siglip": 1.0}, (5, 19)),
                                          ({"task": 0.0, "sigmoid_kd": -2.0}, (32, 33))],
                         ids=["both", "siglip-rows", "sigmoid_kd-last-row"])
def test_triton_row_blocks_cross_tiles(weights, rows):
    compare("triton", make_inputs(33, 17), torch.float32, weights=weights, row_start=rows[0], row_stop=rows[1],
            grad_output=-1.5, tiles=SMALL_TILES)


def test_triton_stream_splits():
    """A small program target splits both backward passes' streamed axes into runs of tiles, each in its own slab."""
    assert triton_config.stream_split(3, 2, 32, 4) == (2, 32)  # row pass: 3 row blocks, 2 column tiles
    compare("triton", make_inputs(40, 17), torch.float32, row_start=2, row_stop=40,
            tiles=dataclasses.replace(SMALL_TILES, target_programs=4))


def test_one_teacher_of_the_student_width_with_every_other_term():
    """A single teacher tensor feeds sigmoid_kd and the row-softmax terms alike; triton and chunked agree."""
    inputs = make_inputs(9, 8, widths=(8,))
    weights = {"task": 1.0, "hrd": 1.0, "icl": 1.0, "fd": 10.0, "siglip": 1.0, "sigmoid_kd": 1.0}
    compare("chunked", inputs, torch.float32, weights=weights)
    compare("triton", inputs, torch.float32, weights=weights)


# ---- the contract ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_a_nan_row_never_gives_a_finite_loss(backend, where):
    inputs = make_inputs(7, 5)
    poisoned = inputs["s_txt"] if where == "student" else inputs["t_img"][1]
    poisoned[3] = float("nan")
    terms, _ = run(backend, inputs, torch.float32)
    for term in ("total", "sigmoid_kd") + (("siglip",) if where == "student" else ()):
        assert not math.isfinite(terms[term].item()), f"{backend}: {term} finite from a NaN {where} row"
    if where == "teacher":
        assert math.isfinite(terms["siglip"].item())


def test_terms_absent_at_zero_weight_and_no_grad_matches():
    inputs = make_inputs(7, 5)
    terms, _ = run("chunked", inputs, torch.float32, weights={"task": 0.0, "siglip": 1.0})
    assert set(terms) == {"total", "siglip"}
    with torch.no_grad():
        quiet = clip_rd_loss(inputs["s_img"].float(), inputs["s_txt"].float(), inputs["t_img"], inputs["t_txt"],
                             student_scale=14.3, student_bias=-3.0, teacher_scale=TEACHER_SCALES,
                             teacher_bias=TEACHER_BIASES, weights=SIGMOID, backend="chunked")
    loud, _ = run("chunked", inputs, torch.float32)
    for key in loud:
        assert quiet[key].item() == pytest.approx(loud[key].item(), rel=1e-6)


def _call(**changes):
    inputs = make_inputs(6, 8)
    args = dict(s_img=inputs["s_img"], s_txt=inputs["s_txt"], t_img=inputs["t_img"], t_txt=inputs["t_txt"],
                student_scale=10.0, teacher_scale=TEACHER_SCALES, teacher_bias=TEACHER_BIASES, weights=SIGMOID,
                backend="chunked")
    args.update(changes)
    return clip_rd_loss(args.pop("s_img"), args.pop("s_txt"), args.pop("t_img"), args.pop("t_txt"), **args)


BAD_CASES = [
    ("bias without a scale", dict(teacher_scale=None), "teacher_bias: given without teacher_scale"),
    ("member widths differ", dict(t_txt=[torch.randn(6, 12).double(), torch.randn(6, 12).double()]),
     r"t_txt\[1\]: width 12 does not match t_img\[1\] width 20"),
    ("ensemble with icl", dict(weights={**SIGMOID, "icl": 1.0}),
     r"ensemble='average-after-softmax': weights \['icl'\] put teacher and student embeddings side by side"),
    ("scales per teacher", dict(teacher_scale=[1.0, 2.0, 3.0]), r"teacher_scale: 3 value\(s\) for 2 teacher"),
    ("ensembles differ", dict(t_txt=[torch.randn(6, 12)]), r"t_txt: 1 teacher\(s\) but t_img has 2"),
    ("empty ensemble", dict(t_img=[]), "t_img: an empty teacher ensemble"),
    ("teacher rows", dict(t_img=[torch.randn(6, 12), torch.randn(5, 20)]), r"t_img\[1\]: 5 rows but s_img has 6"),
    ("student bias shape", dict(student_bias=torch.ones(2)), "student_bias: expected a scalar"),
    ("kd without a scale", dict(teacher_scale=None, teacher_bias=None), "teacher_scale: required"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_refused_in_one_line(case):
    _, changes, message = case
    with pytest.raises(ValueError, match=message) as refused:
        _call(**changes)
    assert "\n" not in str(refused.value)


def test_auto_leaves_triton_for_teachers_wider_than_the_kernels():
    wide = SigmoidTeacher(torch.zeros(3, 4096), torch.zeros(3, 4096), torch.tensor(1.0), torch.tensor(0.0))
    reason = triton_unsupported(resolve_weights(SIGMOID), torch.zeros(3, 8), None, (wide,))
    assert "width 4096 exceeds the Triton kernels' maximum" in reason


def test_module_takes_the_students_bias_and_an_ensemble():
    """ClipRDLoss: the sigmoid terms on the student's own embeddings (never projected), the student's logit bias and
    the teachers' scales and biases given to forward, as open_clip's models own them."""
    torch.manual_seed(0)
    image, text = torch.randn(7, 6, requires_grad=True), torch.randn(7, 6, requires_grad=True)
    teacher = torch.randn(7, 10), torch.randn(7, 10)
    bias = torch.tensor(-3.0, requires_grad=True)
    loss = ClipRDLoss({"hrd": 1.0, "siglip": 1.0, "sigmoid_kd": 1.0}, student_dim=6, teacher_dim=10,
                      backend="reference")
    out = loss(image, text, torch.tensor(10.0), *teacher, torch.tensor(20.0), logit_bias=bias, dist_logit_bias=-4.0)
    s_img, s_txt = F.normalize(image, dim=1), F.normalize(text, dim=1)
    t_img, t_txt = (F.normalize(t, dim=1) for t in teacher)
    own = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=10.0, student_bias=-3.0, teacher_scale=20.0,
                       teacher_bias=-4.0, weights={"task": 1.0, "siglip": 1.0, "sigmoid_kd": 1.0}, backend="reference")
    for key in ("task", "siglip", "sigmoid_kd"):
        assert out[key].item() == pytest.approx(own[key].item(), rel=1e-6)
    out["total"].backward()
    assert bias.grad is not None and bias.grad.abs() > 0

    members = [torch.randn(7, 12), torch.randn(7, 20)]
    ensemble = ClipRDLoss(SIGMOID, backend="chunked")
    out = ensemble(image, text, torch.tensor(10.0), members, [m.flip(0) for m in members], TEACHER_SCALES,
                   logit_bias=bias, dist_logit_bias=TEACHER_BIASES)
    want = clip_rd_loss(s_img, s_txt, [F.normalize(m, dim=1) for m in members],
                        [F.normalize(m.flip(0), dim=1) for m in members], student_scale=10.0, student_bias=-3.0,
                        teacher_scale=TEACHER_SCALES, teacher_bias=TEACHER_BIASES, weights=SIGMOID, backend="reference")
    assert out["sigmoid_kd"].item() == pytest.approx(want["sigmoid_kd"].item(), rel=1e-5)


# ---- two gloo ranks ---------------------------------------------------------------------------------------------

WORLD, LOCAL_ROWS, WIDTH = 2, 6, 8
DISTRIBUTED_WEIGHTS = {"task": 1.0, "siglip": 1.0, "sigmoid_kd": 1.0}
DISTRIBUTED_BACKENDS = ("reference", "chunked", "triton")


def _global_batch():
    inputs = make_inputs(WORLD * LOCAL_ROWS, WIDTH, seed=3)
    return inputs["s_img"].float(), inputs["s_txt"].float(), [t.float() for t in inputs["t_img"]], \
        [t.float() for t in inputs["t_txt"]]


def _student():
    """A linear tower per modality and the student's learnable logit scale and bias (open_clip's SigLIP models)."""
    from torch import nn

    torch.manual_seed(0)
    student = nn.Module()
    student.image, student.text = nn.Linear(WIDTH, WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
    student.logit_scale = nn.Parameter(torch.tensor(2.5))
    student.logit_bias = nn.Parameter(torch.tensor(-3.0))
    return student


def _loss(student, images, texts, t_img, t_txt, backend, gather=lambda x: x, row_start=0, row_stop=None):
    s_img = gather(F.normalize(student.image(images), dim=1))
    s_txt = gather(F.normalize(student.text(texts), dim=1))
    return clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=student.logit_scale.exp(),
                        student_bias=student.logit_bias, teacher_scale=TEACHER_SCALES, teacher_bias=TEACHER_BIASES,
                        weights=DISTRIBUTED_WEIGHTS, row_start=row_start, row_stop=row_stop, backend=backend)["total"]


def _rank(rank, port, queue):
    """Local loss with gather-with-grad: this rank's rows against every gathered column; gradients averaged over
    the ranks as DDP does. Returns (loss, gradients) per backend."""
    import torch.distributed as dist
    import torch.distributed.nn

    torch.set_num_threads(1)  # first: a forked process must not enter the parent's OpenMP thread pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images, texts, t_img, t_txt = _global_batch()
        rows = slice(rank * LOCAL_ROWS, (rank + 1) * LOCAL_ROWS)
        results = {}
        for backend in DISTRIBUTED_BACKENDS:
            student = _student()
            loss = _loss(student, images[rows], texts[rows], t_img, t_txt, backend,
                         lambda x: torch.cat(torch.distributed.nn.all_gather(x)), rows.start, rows.stop)
            loss.backward()
            grads = [p.grad for p in student.parameters()]
            for tensor in [loss.detach(), *grads]:
                dist.all_reduce(tensor)
                tensor /= WORLD
            results[backend] = [loss.item(), [g.numpy().copy() for g in grads]]
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_local_loss_equals_the_whole_batch():
    results = run_ranks(_rank, WORLD, start="fork")  # CPU tensors, each rank single-threaded

    images, texts, t_img, t_txt = _global_batch()
    for backend in DISTRIBUTED_BACKENDS:
        student = _student()
        whole = _loss(student, images, texts, t_img, t_txt, backend)
        whole.backward()
        for rank in range(WORLD):
            loss, grads = results[rank][backend]
            assert loss == pytest.approx(whole.item(), rel=1e-5), backend
            for got, param in zip(grads, student.parameters()):
                torch.testing.assert_close(torch.from_numpy(got), param.grad, rtol=1e-4, atol=1e-6)
