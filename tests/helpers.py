"""Shared test inputs: random L2-normalised embeddings, learnable scalars, and a comparison of two backends."""
from __future__ import annotations

import contextlib
import io
from typing import Optional

import torch
import torch.nn.functional as F

from kernels import clip_rd_loss, resolve_weights
from kernels.reference import reference_loss
from kernels.triton_config import BlockConfig

# Per-dtype tolerances on losses and gradients against the fp64 reference on the same (rounded) inputs, relative to
# the largest magnitude of the compared tensor. Low-precision inputs are upcast before any arithmetic, so their
# error comes from rounding the returned gradients (and, in Triton, from tl.dot on low-precision tiles).
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
SCALARS = ("student_scale", "lam_img", "lam_txt", "kappa")
# Blocking small enough that small problems cross every block boundary: the chunked backend's 16-row blocks
# (clip_rd_loss's block_bytes=) and Triton tiles of 16 rows, 32 columns and 16-wide D chunks (its tiles=).
SMALL_BLOCKS = {"block_bytes": 1}
SMALL_TILES = BlockConfig(block_m=16, block_n=32, block_k=16, block_d=16, forward_warps=4, backward_warps=4,
                          num_stages=1)


def make_inputs(n: int, d: int, dtype=torch.float32, seed: int = 0, device="cpu", related: bool = True):
    """Four (n, d) unit-norm embeddings (student ones require grad) and the scalar arguments of clip_rd_loss.

    With ``related`` the teacher and the two modalities share a component, so softmaxes are peaked as in training.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    mix = 0.8 if related else 0.0
    raw = [mix * base + torch.randn(n, d, generator=g) for _ in range(4)]
    s_img, s_txt, t_img, t_txt = [F.normalize(r, dim=1).to(device=device, dtype=dtype) for r in raw]
    s_img.requires_grad_(True)
    s_txt.requires_grad_(True)
    scalars = {
        name: torch.tensor(value, device=device, requires_grad=True)
        for name, value in zip(SCALARS, (14.3, 2.66, 3.1, 2.2))
    }
    return (s_img, s_txt, t_img, t_txt), scalars


def run(backend, embeddings, scalars, weights, row_start=0, row_stop=None, grad_output=1.0, **options):
    """Loss values and gradients w.r.t. s_img, s_txt and the four learnable scalars.

    backend "reference" is the ground truth: the reference objective evaluated in fp64. ``options`` go to
    clip_rd_loss for the other backends (block_bytes=, tiles=).
    """
    as_double = backend == "reference"
    embeddings = [
        (e.detach().double() if as_double else e.detach().clone()).requires_grad_(e.requires_grad) for e in embeddings
    ]
    scalars = {k: (v.detach().double() if as_double else v.detach().clone()).requires_grad_(True)
               for k, v in scalars.items()}
    if as_double:
        teacher_scale = torch.tensor(40.0, dtype=torch.float64)
        terms = reference_loss(
            *embeddings, scalars["student_scale"], teacher_scale, scalars["lam_img"], scalars["lam_txt"],
            scalars["kappa"], scalars["student_scale"], teacher_scale, resolve_weights(weights), row_start,
            embeddings[0].shape[0] if row_stop is None else row_stop,
        )
    else:
        terms = clip_rd_loss(
            *embeddings, teacher_scale=40.0, weights=weights, row_start=row_start, row_stop=row_stop,
            backend=backend, **scalars, **options,
        )
    (terms["total"] * grad_output).backward()
    grads = {"s_img": embeddings[0].grad, "s_txt": embeddings[1].grad}
    grads.update({k: v.grad for k, v in scalars.items()})
    return {k: v.detach() for k, v in terms.items()}, grads


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, floor: float = 1e-3):
    """max |actual - expected| <= tol * max(max |expected|, floor)."""
    if expected is None:
        assert actual is None or not actual.abs().any(), f"{what}: expected no gradient"
        return
    assert actual is not None, f"{what}: missing gradient"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item() / scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def compare_backends(backend, n, d, weights, dtype=torch.float32, row_start=0, row_stop=None, grad_output=1.0,
                     **options):
    """Values and gradients of ``backend`` against the reference on the same (rounded) inputs; ``options`` go to
    clip_rd_loss for ``backend`` (block_bytes=, tiles=)."""
    embeddings, scalars = make_inputs(n, d, dtype)
    ref_terms, ref_grads = run("reference", embeddings, scalars, weights, row_start, row_stop, grad_output)
    terms, grads = run(backend, embeddings, scalars, weights, row_start, row_stop, grad_output, **options)
    assert set(terms) == set(ref_terms), f"term keys {sorted(terms)} != {sorted(ref_terms)}"
    tol = TOLERANCES[dtype]
    for key in ref_terms:
        assert terms[key].dtype == torch.float32 and terms[key].dim() == 0, \
            f"{key}: {terms[key].dtype} {terms[key].shape}"
        # Losses are O(1): a KL near 0 is a difference of O(scale) numbers, so compare on an absolute footing.
        assert_close(terms[key], ref_terms[key], tol, f"term {key}", floor=1.0)
    for key in ref_grads:
        assert_close(grads[key], ref_grads[key], tol, f"grad {key}")
        if grads[key] is not None and not key.startswith("s_"):
            assert grads[key].dtype == torch.float32, f"grad {key}: dtype {grads[key].dtype}"
        if grads[key] is not None and key.startswith("s_"):
            assert grads[key].dtype == dtype, f"grad {key}: dtype {grads[key].dtype} != {dtype}"
    return ref_terms, ref_grads


def assert_same_weights(a: dict, b: dict, rtol: float, atol: float = 2e-6) -> None:
    """Two engine checkpoints hold the same student and loss weights.

    An attention key bias has a zero gradient in exact arithmetic (it shifts every logit of a query alike), so its
    gradient is rounding noise that AdamW turns into steps of up to lr: only the query and value biases compare.
    """
    for part in ("state_dict", "loss_state_dict"):
        for key, value in a[part].items():
            other = b[part][key]
            if key.endswith("attn.in_proj_bias"):
                width = value.numel() // 3
                value = torch.cat([value[:width], value[2 * width:]])
                other = torch.cat([other[:width], other[2 * width:]])
            torch.testing.assert_close(other, value, rtol=rtol, atol=atol, msg=f"{part} {key}")


def command_error(main, argv) -> Optional[str]:
    """Run a command's ``main(argv)``: None when it succeeds; when it refuses, its error line, after checking that it
    is exactly one ``error: ...`` line on stderr and that the exit status is a user error's (2)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main([str(a) for a in argv])
    except SystemExit as exc:
        if exc.code in (0, None):
            return None
        lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
        assert exc.code == 2 and len(lines) == 1, (exc.code, err.getvalue()[-3000:])
        return lines[0]
    return None


def train_cli(tmp_path, synth_data, store_dir, *extra, name="bad"):
    """engine.train's command line on the small data; returns the error line (None: the run succeeded)."""
    from engine import train as train_lib

    argv = ["--train-data", synth_data["train"], "--val-data", synth_data["val"], "--teacher-store", str(store_dir),
            "--batch-size", "16", "--epochs", "1", "--logs", str(tmp_path / "logs"), "--name", name, "--no-progress",
            "--fused", "--cache-dir", str(tmp_path / "cache"), *extra]
    return command_error(train_lib.main, argv)


def assert_refused_before_any_step(tmp_path, message, got, name="bad"):
    """``got`` (train_cli's exit message) is one line holding ``message``, and no step was checkpointed."""
    assert got is not None and got.startswith("error: ") and message in got and "\n" not in got, got
    assert not (tmp_path / "logs" / name / "checkpoints" / "epoch_latest.pt").exists()


def seeded_checkpoint(tmp_path_factory, model: str, seed: int):
    """``model`` with seeded random weights (not the engine's own initialisation) saved as an open_clip-loadable
    checkpoint file."""
    import models

    torch.manual_seed(seed)
    path = tmp_path_factory.mktemp(model) / f"{model}.pt"
    torch.save({"state_dict": models.create_model(model).state_dict()}, path)
    return path


def dead_pid() -> int:
    """The process id of a process that has exited (and been reaped): what a killed run leaves in its temporaries'
    names."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (a process group's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(target, world: int, *args, start: str = "spawn") -> dict:
    """Run ``target(rank, port, queue, *args)`` in ``world`` processes (a gloo group on a free port); each puts
    ``(rank, result)`` on the queue. Returns {rank: result}, after checking that every process exited cleanly.
    ``start="fork"``: ranks inherit the imported modules (a spawned rank spends seconds importing torch); only for
    CPU tensors and single-threaded ranks."""
    import torch.multiprocessing as mp

    ctx, port = mp.get_context(start), free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, port, queue, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0, f"rank process exited with {proc.exitcode}"
    return results


def unit_rows(base: torch.Tensor, generator: torch.Generator, mix: float = 0.8) -> torch.Tensor:
    """Unit rows of ``mix * base`` plus fresh noise: rows built from one base share a component."""
    return F.normalize(mix * base + torch.randn(base.shape, generator=generator, dtype=base.dtype), dim=1)


def teacher_list_inputs(n: int, d: int, widths, seed: int = 0, share_student: bool = True) -> dict:
    """fp64 student (n, d) embeddings and a list of teachers, one (n, width) pair per width: paired rows share a
    component, so positives stand out; with ``share_student`` the teachers also share the student's (they agree)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    inputs = {"s_img": unit_rows(base, g), "s_txt": unit_rows(base, g), "t_img": [], "t_txt": []}
    for width in widths:
        own = torch.randn(n, max(width - d, 0) if share_student else width, generator=g, dtype=torch.float64)
        teacher_base = torch.cat([base, own], 1)[:, :width] if share_student else own
        inputs["t_img"].append(unit_rows(teacher_base, g, 1.5))
        inputs["t_txt"].append(unit_rows(teacher_base, g, 1.5))
    return inputs


def run_teacher_lists(backend: str, inputs: dict, dtype, scalars: dict, grads, grad_output: float = 1.0,
                      one_as_tensor: bool = False, **kwargs):
    """clip_rd_loss on ``inputs`` (s_img, s_txt and lists t_img, t_txt) with every embedding rounded to ``dtype`` and
    ``scalars`` as fp32 leaves: (detached terms, the gradients named in ``grads``). ``one_as_tensor`` passes a
    one-teacher list as its tensor; ``kwargs`` go to clip_rd_loss."""
    embeddings = {k: inputs[k].detach().to(dtype).requires_grad_(True) for k in ("s_img", "s_txt")}
    leaves = {k: torch.as_tensor(v, dtype=torch.float32).clone().requires_grad_(True) for k, v in scalars.items()}
    teachers = [[t.to(dtype) for t in inputs[k]] for k in ("t_img", "t_txt")]
    if one_as_tensor and len(teachers[0]) == 1:
        teachers = [side[0] for side in teachers]
    terms = clip_rd_loss(embeddings["s_img"], embeddings["s_txt"], *teachers, backend=backend, **leaves, **kwargs)
    (terms["total"] * grad_output).backward()
    leaves.update(embeddings)
    return {k: v.detach() for k, v in terms.items()}, {k: leaves[k].grad for k in grads}


def compare_with_reference(run, backend: str, inputs: dict, dtype, grads, **kwargs) -> None:
    """``run(backend, inputs, dtype, **kwargs) -> (terms, gradients)`` on ``dtype`` inputs against
    ``run("reference", ...)`` in fp64 on the same rounded inputs: every term, and the gradients named in ``grads``
    (the embeddings' in ``dtype``, the scalars' in fp32)."""
    rounded = {**inputs, **{k: inputs[k].to(dtype).double() for k in ("s_img", "s_txt")},
               **{k: [t.to(dtype).double() for t in inputs[k]] for k in ("t_img", "t_txt")}}
    want_terms, want_grads = run("reference", rounded, **kwargs)
    terms, got = run(backend, inputs, dtype, **kwargs)
    assert set(terms) == set(want_terms)
    tol = TOLERANCES[dtype]
    for key in want_terms:
        assert terms[key].dtype == torch.float32 and terms[key].dim() == 0
        assert_close(terms[key], want_terms[key], tol, f"term {key}", floor=1.0)
    for key in grads:
        assert_close(got[key], want_grads[key], tol, f"grad {key}")
        assert got[key].dtype == (dtype if key.startswith("s_") else torch.float32), f"grad {key}: {got[key].dtype}"


def shard_captions(pattern: str, count: int) -> list[list[list[str]]]:
    """Per shard of ``pattern``, per sample, its first ``count`` captions (.txt, then syn.json's)."""
    from engine.data import shards as data_lib
    return [[data_lib.sample_captions(raw, count) for raw in data_lib.read_shard(url)]
            for url in data_lib.expand_urls(pattern)]


def distinct_per_shard(shards: list[list[list[str]]]) -> int:
    """The captions distinct within their shard, summed over the shards: a store build's text rows embedded."""
    return sum(len({caption for captions in shard for caption in captions}) for shard in shards)
