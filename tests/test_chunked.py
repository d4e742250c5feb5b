"""The streamed chunked backend against the reference: values and gradients."""
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.chunked as chunked
from kernels import PRESETS
from tests.helpers import TOLERANCES, assert_close, compare_backends, make_inputs, run

SINGLE_TERMS = [{"task": 1.0}, {"task": 0.0, "icl": 1.0}, {"task": 0.0, "hrd": 1.0}, {"task": 0.0, "vrd": 1.0},
                {"task": 0.0, "xrd": 1.0}, {"task": 0.0, "intra": 1.0}, {"task": 0.0, "gd": 1.0},
                {"task": 0.0, "fd": 1.0}]
SHAPES = [(1, 8), (3, 8), (37, 24), (129, 64), (256, 130)]


# Blocks of 16 rows even at small N, so every test crosses block boundaries.
SMALL_BLOCKS = {"block_bytes": 1}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("n,d", SHAPES)
def test_presets_match_reference(preset, n, d):
    if preset == "intra-kd" and n < 2:
        pytest.skip("intra needs N >= 2")
    compare_backends("chunked", n, d, preset, **SMALL_BLOCKS)


@pytest.mark.parametrize("weights", SINGLE_TERMS, ids=lambda w: next(k for k, v in w.items() if v))
@pytest.mark.parametrize("n,d", [(3, 8), (37, 24), (129, 130)])
def test_single_terms_match_reference(weights, n, d):
    compare_backends("chunked", n, d, weights, **SMALL_BLOCKS)


@pytest.mark.parametrize("preset", ["clip-rd", "intra-kd"])
@pytest.mark.parametrize("rows", [(5, 19), (0, 1), (36, 37), (0, 37)])
def test_local_rows_match_reference(preset, rows):
    compare_backends("chunked", 37, 24, preset, row_start=rows[0], row_stop=rows[1], **SMALL_BLOCKS)


@pytest.mark.parametrize("d", [1152, 1280])
@pytest.mark.parametrize("weights", [*sorted(PRESETS), {**PRESETS["clip-kd"], "vrd": 1.0, "xrd": 1.0, "gd": 1.0}],
                         ids=lambda w: w if isinstance(w, str) else "every-term")
def test_wide_teachers_match_reference(weights, d):
    """SigLIP SO400M (1152) and ViT-bigG-14 (1280) widths: every preset, and every term with gd at once."""
    compare_backends("chunked", 37, d, weights, **SMALL_BLOCKS)


def test_gd_local_rows_match_reference():
    compare_backends("chunked", 37, 24, {"gd": 1.0, "hrd": 1.0}, row_start=3, row_stop=30, **SMALL_BLOCKS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(37, 24), (129, 64)])
def test_low_precision_inputs(dtype, n, d):
    compare_backends("chunked", n, d, {**PRESETS["intra-kd"], "vrd": 1.0, "xrd": 1.0, "gd": 1.0}, dtype=dtype,
                     **SMALL_BLOCKS)


def test_grad_output_scales_every_gradient():
    compare_backends("chunked", 37, 24, {**PRESETS["clip-rd"], "gd": 0.5}, grad_output=-2.5, **SMALL_BLOCKS)


def test_block_size_helper():
    assert chunked.block_rows_for(4096, 4096) % 16 == 0
    assert chunked.block_rows_for(10, 3) == 3
    assert chunked.block_rows_for(37, 37, block_bytes=1) == 16  # SMALL_BLOCKS: every test crosses block boundaries


def test_zero_multiplier_scale_gradient():
    """At a zero multiplier the scale gradient cannot be read off the log-softmax; the product path must take over."""
    embeddings, scalars = make_inputs(37, 24)
    scalars["lam_img"] = torch.tensor(0.0, requires_grad=True)
    scalars["kappa"] = torch.tensor(0.0, requires_grad=True)
    ref_terms, ref_grads = run("reference", embeddings, scalars, "clip-rd")
    terms, grads = run("chunked", embeddings, scalars, "clip-rd", **SMALL_BLOCKS)
    for key in ("lam_img", "kappa", "lam_txt", "student_scale"):
        assert_close(grads[key], ref_grads[key], TOLERANCES[torch.float32], f"grad {key}")


class _Products(TorchDispatchMode):
    """Counts the matrix products (mm, addmm) run while the mode is active."""

    PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.PRODUCTS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weights", [{"task": 0.0, "hrd": 1.0}, {"task": 0.0, "gd": 1.0},
                                     {"task": 0.0, "siglip": 1.0}], ids=["relational", "gd", "sigmoid"])
def test_block_bytes_reaches_every_streamed_loop(weights):
    """block_bytes=1 makes 16-row blocks: at N = 37 every streamed loop runs three blocks, three times the products
    of the default's one block (so the parameter the other tests pass is not silently dropped)."""
    def products(**options):
        embeddings, scalars = make_inputs(37, 24)
        with _Products() as mode:
            run("chunked", embeddings, scalars, weights, **options)
        return mode.count

    assert products(block_bytes=1) == 3 * products()


@pytest.mark.parametrize("options,error", [({"block_bytes": 0}, "block_bytes: expected a positive int, got 0"),
                                           ({"block_bytes": 2.5}, "block_bytes: expected a positive int, got 2.5"),
                                           ({"block_bytes": True}, "block_bytes: expected a positive int, got True")])
def test_bad_block_bytes_refused(options, error):
    embeddings, scalars = make_inputs(5, 8)
    with pytest.raises(ValueError, match=re.escape(error)):
        run("chunked", embeddings, scalars, "clip-rd", **options)
