"""The fused Triton backend against the reference, values and gradients, on CPU under TRITON_INTERPRET=1."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the interpreter

import dataclasses
import subprocess
import sys

import pytest
import torch

import kernels.triton_config as triton_config
import kernels.triton_fused as triton_fused
from kernels import PRESETS, clip_rd_loss, resolve_weights, spec
from kernels.functional import triton_unsupported
from kernels.triton_config import BlockConfig, block_config
from tests.helpers import TOLERANCES, assert_close, compare_backends, make_inputs, run, run_ranks

GD = {"task": 0.0, "gd": 1.0}
SINGLE_TERMS = [{"task": 1.0}, {"task": 0.0, "icl": 1.0}, {"task": 0.0, "hrd": 1.0}, {"task": 0.0, "vrd": 1.0},
                {"task": 0.0, "xrd": 1.0}, {"task": 0.0, "intra": 1.0}, {"task": 0.0, "cross_kd": 1.0}, GD]
# Every relational term and gd at once: one call covers every kernel path (used where each case is costly).
EVERY_TERM = {**PRESETS["intra-kd"], "vrd": 1.0, "xrd": 1.0, "cross_kd": 1.0, "gd": 2.0}
WEIGHT_SETS = {**PRESETS, "clip-kd+gd": {**PRESETS["clip-kd"], "gd": 3.0}}  # gd alone: SINGLE_TERMS
# The shape table, spread over the weight sets rather than crossed with them (the interpreter is slow). With the
# default fp32 tiles (32 x 32) N = 69 and 129 cross several row and column blocks, the last one ragged.
SHAPES = {
    "baseline": [(1, 8), (129, 24)],
    "clip-kd": [(3, 8), (37, 24)],
    "clip-rd": [(1, 8), (37, 24)],
    "intra-kd": [(3, 8), (69, 24)],
    "clip-kd+gd": [(1, 8), (69, 24)],
}
# 16-row, 32-column tiles and 16-wide D chunks (clip_rd_loss's tiles=), so small problems cross every block boundary.
SMALL_TILES = BlockConfig(block_m=16, block_n=32, block_k=16, block_d=16, forward_warps=4, backward_warps=4,
                          num_stages=1)
# Wide teachers under the interpreter: the real configurations walk D = 1280 in 16-wide (fp32) chunks, thousands of
# interpreted steps per tile; 256-wide chunks cover the same D loops (the last chunk ragged at D = 1152) in seconds.
# The real configurations at these widths are compiled in tests/test_triton_compile.py and run once below.
WIDE_CHUNKS = BlockConfig(block_m=16, block_n=16, block_k=256, block_d=256, forward_warps=4, backward_warps=4,
                          num_stages=1)


@pytest.mark.parametrize("name,n,d", [(name, n, d) for name, shapes in SHAPES.items() for n, d in shapes])
def test_weight_sets_match_reference(name, n, d):
    compare_backends("triton", n, d, WEIGHT_SETS[name])


@pytest.mark.parametrize("name", sorted(WEIGHT_SETS))
def test_weight_sets_match_reference_small_tiles(name):
    compare_backends("triton", 37, 24, WEIGHT_SETS[name], tiles=SMALL_TILES)


@pytest.mark.parametrize("weights", SINGLE_TERMS, ids=lambda w: next(k for k, v in w.items() if v))
@pytest.mark.parametrize("n,d", [(3, 8), (37, 24)])
def test_single_terms_match_reference(weights, n, d):
    compare_backends("triton", n, d, weights, tiles=SMALL_TILES)


@pytest.mark.parametrize("weights", [PRESETS["clip-rd"], {**PRESETS["intra-kd"], "gd": 1.0}],
                         ids=["clip-rd", "intra+gd"])
@pytest.mark.parametrize("rows", [(5, 19), (0, 1), (36, 37)])
def test_local_rows_match_reference(weights, rows):
    compare_backends("triton", 37, 24, weights, row_start=rows[0], row_stop=rows[1], tiles=SMALL_TILES)


@pytest.mark.parametrize("weights,rows", [(PRESETS["clip-rd"], (5, 60)), ({**PRESETS["intra-kd"], "gd": 1.0}, (0, 69))])
def test_many_width_chunks_and_stream_splits(weights, rows):
    """D = 40 is three 16-wide read-modify-write chunks (the last ragged); a small program target splits both
    backward passes' streamed axes (and gd's product passes) into runs of several tiles (the last shorter), each
    into its own slab."""
    tiles = dataclasses.replace(SMALL_TILES, target_programs=12)
    assert triton_config.stream_split(2 * 4, 3, 32, 12) == (2, 64)  # row pass of (5, 60): 4 row blocks, 3 col tiles
    assert triton_config.stream_split(2 * 3, 5, 16, 12) == (2, 48)  # column pass of (0, 69): 5 row blocks
    compare_backends("triton", 69, 40, weights, row_start=rows[0], row_stop=rows[1], tiles=tiles)


@pytest.mark.parametrize("d", [1152, 1280])
@pytest.mark.parametrize("name", sorted(WEIGHT_SETS))
def test_wide_teachers_match_reference(name, d):
    """SigLIP SO400M (1152) and ViT-bigG-14 (1280) widths, every preset and gd, values and gradients."""
    compare_backends("triton", 5, d, WEIGHT_SETS[name], row_start=1, row_stop=4, tiles=WIDE_CHUNKS)


def test_wide_teachers_with_the_real_tiles():
    """The tiles a GPU gets at D = 1280 (fp16: 64-wide chunks), every relational term and gd, local rows."""
    compare_backends("triton", 5, 1280, EVERY_TERM, dtype=torch.float16, row_start=1, row_stop=4)


def test_views_shared_between_terms():
    """cross_kd's S_I T_T^T is icl's CE view and xrd's KD partner too, and its target T_I T_T^T is also hrd's:
    a view with a CE use and KD targets sits in one pair per partner, with its CE counted once, and a target shared by
    several pairs is recomputed in each."""
    weights = {"task": 0.0, "icl": 1.0, "hrd": 1.0, "xrd": 1.0, "cross_kd": 1.0}
    pairs = triton_fused._build_pairs(resolve_weights(weights))
    view = spec.View("s_img", "t_txt", "kappa")
    target = spec.View("t_img", "t_txt", "teacher")
    partners = {pair.q if pair.p == view else pair.p for pair in pairs if view in (pair.p, pair.q)}
    assert partners == {target, spec.View("s_txt", "t_img", "kappa")}
    ce_uses = [use for pair in pairs for slot, use in pair.uses if use.target is None and use.view == view]
    assert len(ce_uses) == 1
    assert sum(target in (pair.p, pair.q) for pair in pairs) == 2  # hrd's and cross_kd's
    compare_backends("triton", 37, 24, weights, tiles=SMALL_TILES)


def test_stream_split_covers_the_axis_with_whole_tiles():
    for owned in (1, 2, 7, 255, 256, 1000):
        for streamed in (1, 2, 3, 37, 512):
            splits, per_split = triton_config.stream_split(owned, streamed, 32)
            tiles = per_split // 32
            assert per_split % 32 == 0 and (splits - 1) * tiles < streamed <= splits * tiles  # no empty split
            assert owned * splits >= min(triton_config.TARGET_PROGRAMS, owned * streamed) or splits == streamed


def test_local_rows_default_tiles():
    compare_backends("triton", 69, 24, WEIGHT_SETS["clip-kd+gd"], row_start=32, row_stop=69)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,n,d", [("clip-rd", 37, 130), ("intra-kd", 69, 72)])
def test_low_precision_inputs(dtype, name, n, d):
    compare_backends("triton", n, d, {**PRESETS[name], "vrd": 1.0, "xrd": 1.0, "gd": 1.0}, dtype=dtype)


def test_grad_output_scales_every_gradient():
    compare_backends("triton", 21, 24, {**PRESETS["clip-rd"], "intra": 0.5, "gd": 2.0}, grad_output=-2.5,
                     tiles=SMALL_TILES)


@pytest.mark.parametrize("student,teacher", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32)])
def test_teacher_dtype_differs_from_student(student, teacher):
    """Teacher embeddings are cast to the student dtype; the reference sees the teacher as stored."""
    embeddings, scalars = make_inputs(21, 24, student)
    embeddings = [*embeddings[:2], *(t.to(teacher) for t in embeddings[2:])]
    weights = {**PRESETS["clip-rd"], "gd": 1.0}
    ref_terms, ref_grads = run("reference", embeddings, scalars, weights)
    terms, grads = run("triton", embeddings, scalars, weights)
    tol = max(TOLERANCES[student], TOLERANCES[teacher])
    for key in ref_terms:
        assert_close(terms[key], ref_terms[key], tol, f"term {key}", floor=1.0)
    for key in ref_grads:
        assert_close(grads[key], ref_grads[key], tol, f"grad {key}")
    assert grads["s_img"].dtype == student


def test_terms_are_detached_and_total_differentiable():
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(37, 24)
    terms = clip_rd_loss(s_img, s_txt, t_img, t_txt, teacher_scale=40.0, weights="intra-kd", backend="triton",
                         **scalars)
    assert terms["total"].requires_grad
    assert all(not value.requires_grad for key, value in terms.items() if key != "total")


def test_zero_weight_terms_have_no_kernel_work():
    """Only the active views reach the kernels: baseline is one CE-only pair per direction."""
    plan = triton_fused._plan(tuple(sorted(resolve_weights("baseline").items())), torch.device("cpu"))
    assert plan.terms == ("task",)
    assert plan.table[:, triton_fused._PAIR_COLUMNS.index("has_q")].tolist() == [0, 0]
    clip_rd = triton_fused._plan(tuple(sorted(resolve_weights("clip-rd").items())), torch.device("cpu"))
    assert clip_rd.table.shape[0] == 6  # the six distinct products, each in both directions, as 6 view pairs


def _backend_inputs(dtype=torch.float32, width=8):
    (s_img, s_txt, t_img, t_txt), _ = make_inputs(3, width, dtype)
    inputs = {"s_img": s_img, "s_txt": s_txt, "t_img": t_img, "t_txt": t_txt}
    scales = {name: torch.tensor(1.0) for name in spec.SCALES}
    return inputs, scales


def test_auto_takes_triton_wherever_it_runs_and_falls_back_per_call():
    """Every term, gd and a process group run on Triton; only what the kernels cannot take goes to chunked."""
    (s_img, _, _, _), _ = make_inputs(5, 8)
    for weights in (EVERY_TERM, GD, "clip-rd"):
        assert triton_unsupported(resolve_weights(weights), s_img, None) is None
        assert triton_unsupported(resolve_weights(weights), s_img, object()) is None
    assert "exceeds the Triton kernels' maximum" in triton_unsupported(resolve_weights(GD), torch.zeros(3, 2049), None)
    assert "float64" in triton_unsupported(resolve_weights(GD), s_img.double(), None)


def test_gd_double_backward_is_refused():
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(7, 8)
    total = clip_rd_loss(s_img, s_txt, t_img, t_txt, teacher_scale=40.0, weights=GD, backend="triton",
                         **scalars)["total"]
    with pytest.raises(RuntimeError, match="double backward .* not supported by the triton backend"):
        torch.autograd.grad(total, s_img, create_graph=True)


def test_gd_in_the_published_code_convention():
    """gd with logits X Y^T / s (the published CLIP-KD code): Triton against the fp64 reference, with gradients."""
    embeddings, scalars = make_inputs(37, 24)

    def gd(backend, dtype):
        inputs = [e.detach().to(dtype).requires_grad_(e.requires_grad) for e in embeddings]
        scale = scalars["student_scale"].detach().to(dtype).requires_grad_(True)
        terms = clip_rd_loss(*inputs, student_scale=scale, teacher_scale=40.0, weights={"task": 0.0, "gd": 1e3},
                             backend=backend, gd_convention="clip-kd-code")
        return [terms["gd"], *torch.autograd.grad(terms["total"], [inputs[0], inputs[1], scale])]

    for got, want in zip(gd("triton", torch.float32), gd("reference", torch.float64)):
        assert_close(got, want, TOLERANCES[torch.float32], "clip-kd-code gd")


def test_a_nan_teacher_row_makes_gd_nan():
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(9, 8)
    t_img = t_img.clone()
    t_img[4] = float("nan")
    terms = clip_rd_loss(s_img, s_txt, t_img, t_txt, teacher_scale=40.0, weights=GD, backend="triton", **scalars)
    assert not torch.isfinite(terms["gd"]) and not torch.isfinite(terms["total"])


def test_unsupported_width_and_dtype_raise():
    inputs, scales = _backend_inputs(width=2049)
    with pytest.raises(ValueError, match="D = 2049 exceeds"):
        triton_fused.triton_relational_loss(inputs, scales, resolve_weights("clip-rd"), 0, 3)
    inputs, scales = _backend_inputs(dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        triton_fused.triton_relational_loss(inputs, scales, resolve_weights("clip-rd"), 0, 3)


def test_tiles_of_another_type_refused_before_any_launch():
    inputs, scales = _backend_inputs()
    with pytest.raises(TypeError, match="tiles: expected a kernels.triton_config.BlockConfig, got dict"):
        triton_fused.triton_relational_loss(inputs, scales, resolve_weights("clip-rd"), 0, 3, tiles={"block_m": 16})

def test_block_config_depends_on_width_and_dtype_only():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for width in (1, 8, 130, 1024):
            cfg = block_config(width, dtype)
            assert min(cfg.block_m, cfg.block_n, cfg.block_k, cfg.block_d) >= 16  # tl.dot's minimum
            assert cfg.block_d <= max(16, width) * 2 and cfg.block_k <= max(16, width) * 2


def test_cpu_without_interpreter_raises():
    """Without TRITON_INTERPRET=1 (read at import) CPU tensors get a clear RuntimeError, not a Triton crash."""
    script = (
        "import torch; from kernels.triton_fused import triton_relational_loss as f\n"
        "x = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)\n"
        "from kernels.spec import SCALES; s = {k: torch.tensor(1.0) for k in SCALES}\n"
        "from kernels import resolve_weights\n"
        "try:\n"
        "    f({'s_img': x, 's_txt': x, 't_img': x, 't_txt': x}, s, resolve_weights('clip-rd'), 0, 3)\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert "RuntimeError: triton backend needs CUDA tensors" in out.stdout, out.stdout + out.stderr


GROUP_WORLD, GROUP_ROWS = 2, 6
GROUP_WEIGHTS = {"task": 1.0, "hrd": 1.0, "gd": 3.0}


def _group_worker(rank, port, queue):
    """One rank of a local loss: its own anchor rows, every column, gd's sums all-reduced over the group.

    Returns the rank's loss and the gradients of its full-batch embedding copy and of the student scale, each summed
    over the ranks: the sum is what gather-with-grad and DDP produce, world size times the whole-batch gradient."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=GROUP_WORLD)
    torch.set_num_threads(1)
    try:
        (s_img, s_txt, t_img, t_txt), scalars = make_inputs(GROUP_WORLD * GROUP_ROWS, 8)
        rows = (rank * GROUP_ROWS, (rank + 1) * GROUP_ROWS)
        terms = clip_rd_loss(s_img, s_txt, t_img, t_txt, teacher_scale=40.0, weights=GROUP_WEIGHTS, backend="triton",
                             row_start=rows[0], row_stop=rows[1], group=dist.group.WORLD, **scalars)
        terms["total"].backward()
        summed = [terms["total"].detach(), terms["gd"], s_img.grad, s_txt.grad, scalars["student_scale"].grad]
        for tensor in summed:
            dist.all_reduce(tensor)
        queue.put((rank, [t.numpy().copy() for t in summed]))
    finally:
        dist.destroy_process_group()


def test_gd_under_a_process_group_equals_the_whole_batch():
    """Two gloo ranks, each owning half the anchor rows: the mean of their losses and the sum of their gradients
    over the world size equal the whole batch (gd's R^T X sums and their gradient's upstream are all-reduced)."""
    results = run_ranks(_group_worker, GROUP_WORLD)

    embeddings, scalars = make_inputs(GROUP_WORLD * GROUP_ROWS, 8)
    ref_terms, ref_grads = run("reference", embeddings, scalars, GROUP_WEIGHTS)
    want = [ref_terms["total"], ref_terms["gd"], ref_grads["s_img"], ref_grads["s_txt"], ref_grads["student_scale"]]
    names = ["total", "gd", "grad s_img", "grad s_txt", "grad student_scale"]
    for rank in range(GROUP_WORLD):
        for name, got, expected in zip(names, results[rank], want):
            assert_close(torch.from_numpy(got) / GROUP_WORLD, expected, TOLERANCES[torch.float32], name)
