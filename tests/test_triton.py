"""The fused Triton backend against the reference, values and gradients, on CPU under TRITON_INTERPRET=1."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the interpreter

import subprocess
import sys

import pytest
import torch

import kernels.triton_config as triton_config
import kernels.triton_fused as triton_fused
from kernels import PRESETS, clip_rd_loss, resolve_weights, spec
from kernels.functional import triton_unsupported
from kernels.triton_config import BlockConfig, block_config
from tests.helpers import TOLERANCES, assert_close, compare_backends, make_inputs, run

SINGLE_TERMS = [{"task": 1.0}, {"task": 0.0, "icl": 1.0}, {"task": 0.0, "hrd": 1.0}, {"task": 0.0, "vrd": 1.0},
                {"task": 0.0, "xrd": 1.0}, {"task": 0.0, "intra": 1.0}, {"task": 0.0, "cross_kd": 1.0}]
# The shape table, spread over the presets rather than crossed with them (the interpreter is slow).
PRESET_SHAPES = {
    "baseline": [(1, 8), (3, 8), (129, 64), (256, 24)],
    "clip-kd": [(1, 8), (37, 24), (256, 8)],
    "clip-rd": [(1, 8), (3, 8), (37, 24), (129, 24)],
    "intra-kd": [(3, 8), (37, 130), (256, 24)],
}
SMALL_TILES = BlockConfig(block_m=16, block_n=32, block_k=16, block_d=16, forward_warps=4, backward_warps=4,
                          num_stages=1)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-row, 32-column tiles and 16-wide D chunks, so small problems cross every block boundary."""
    monkeypatch.setattr(triton_fused, "block_config", lambda width, dtype: SMALL_TILES)


@pytest.mark.parametrize("preset,n,d", [(p, n, d) for p, shapes in PRESET_SHAPES.items() for n, d in shapes])
def test_presets_match_reference(preset, n, d):
    compare_backends("triton", n, d, preset)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_match_reference_small_tiles(small_tiles, preset):
    compare_backends("triton", 37, 24, preset)


@pytest.mark.parametrize("weights", SINGLE_TERMS, ids=lambda w: next(k for k, v in w.items() if v))
@pytest.mark.parametrize("n,d", [(3, 8), (37, 24)])
def test_single_terms_match_reference(small_tiles, weights, n, d):
    compare_backends("triton", n, d, weights)


@pytest.mark.parametrize("preset", ["clip-rd", "intra-kd"])
@pytest.mark.parametrize("rows", [(5, 19), (0, 1), (36, 37)])
def test_local_rows_match_reference(small_tiles, preset, rows):
    compare_backends("triton", 37, 24, preset, row_start=rows[0], row_stop=rows[1])


@pytest.mark.parametrize("preset,rows", [("clip-rd", (5, 60)), ("intra-kd", (0, 69))])
def test_many_width_chunks_and_stream_splits(small_tiles, monkeypatch, preset, rows):
    """D = 130 is nine 16-wide read-modify-write chunks (the last ragged); a small program target splits both
    backward passes' streamed axes into runs of several tiles (the last shorter), each into its own slab."""
    monkeypatch.setattr(triton_config, "TARGET_PROGRAMS", 12)
    assert triton_config.stream_split(2 * 4, 3, 32) == (2, 64)  # row pass of (5, 60): 4 row blocks, 3 col tiles
    assert triton_config.stream_split(2 * 3, 5, 16) == (2, 48)  # column pass of (0, 69): 5 row blocks
    compare_backends("triton", 69, 130, preset, row_start=rows[0], row_stop=rows[1])


def test_stream_split_covers_the_axis_with_whole_tiles():
    for owned in (1, 2, 7, 255, 256, 1000):
        for streamed in (1, 2, 3, 37, 512):
            splits, per_split = triton_config.stream_split(owned, streamed, 32)
            tiles = per_split // 32
            assert per_split % 32 == 0 and (splits - 1) * tiles < streamed <= splits * tiles  # no empty split
            assert owned * splits >= min(triton_config.TARGET_PROGRAMS, owned * streamed) or splits == streamed


def test_local_rows_default_tiles():
    compare_backends("triton", 129, 64, "clip-rd", row_start=64, row_stop=129)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset,n,d", [("clip-rd", 37, 130), ("intra-kd", 129, 130)])
def test_low_precision_inputs(dtype, preset, n, d):
    compare_backends("triton", n, d, {**PRESETS[preset], "vrd": 1.0, "xrd": 1.0}, dtype=dtype)


def test_grad_output_scales_every_gradient(small_tiles):
    compare_backends("triton", 37, 24, {**PRESETS["clip-rd"], "intra": 0.5}, grad_output=-2.5)


@pytest.mark.parametrize("student,teacher", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32)])
def test_teacher_dtype_differs_from_student(student, teacher):
    """Teacher embeddings are cast to the student dtype; the reference sees the teacher as stored."""
    embeddings, scalars = make_inputs(37, 24, student)
    embeddings = [*embeddings[:2], *(t.to(teacher) for t in embeddings[2:])]
    ref_terms, ref_grads = run("reference", embeddings, scalars, "clip-rd")
    terms, grads = run("triton", embeddings, scalars, "clip-rd")
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


def test_gd_goes_to_chunked_under_auto_and_is_refused_by_name():
    """gd is not in the kernels: 'auto' takes the chunked backend per call; an explicit 'triton' says why."""
    (s_img, s_txt, t_img, t_txt), scalars = make_inputs(5, 8)
    assert "gd is computed by the chunked backend" in triton_unsupported(resolve_weights({"gd": 1.0}), s_img, None)
    assert triton_unsupported(resolve_weights("clip-rd"), s_img, None) is None
    with pytest.raises(ValueError, match="backend='triton': gd is computed by the chunked backend"):
        clip_rd_loss(s_img, s_txt, t_img, t_txt, teacher_scale=40.0, weights={"gd": 1.0}, backend="triton", **scalars)


def test_wide_teachers_match_reference():
    """SigLIP SO400M and ViT-bigG-14 widths, every relational term, local rows."""
    weights = {**PRESETS["intra-kd"], "vrd": 1.0, "xrd": 1.0, "cross_kd": 1.0}
    compare_backends("triton", 5, 1280, weights, row_start=1, row_stop=4)


def test_unsupported_width_and_dtype_raise():
    inputs, scales = _backend_inputs(width=2049)
    with pytest.raises(ValueError, match="D = 2049 exceeds"):
        triton_fused.triton_relational_loss(inputs, scales, resolve_weights("clip-rd"), 0, 3)
    inputs, scales = _backend_inputs(dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        triton_fused.triton_relational_loss(inputs, scales, resolve_weights("clip-rd"), 0, 3)


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
