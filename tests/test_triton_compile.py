"""Ahead-of-time compile of every fused Triton kernel for sm_80 and sm_90 (no GPU needed): no register spills.

Each kernel (both directions of the one-body passes) is compiled with the constexprs the host wrapper would pass
(fp32 / bf16 / fp16 inputs, every distinct width chunk; the sigmoid terms' kernels at the widest), then its PTX is
assembled by the ptxas that ships in the Triton wheel, whose -v report gives registers and spill bytes; shared memory
comes from Triton's metadata. The compilation runs in a subprocess without TRITON_INTERPRET (CI sets it), because
under the interpreter @triton.jit gives no compilable kernels, and spreads the kernels over the machine's cores.

Run ``python -m tests.test_triton_compile`` to print the table alone.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

TARGETS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
# One width per distinct compiled variant: 16-wide chunks and a width not divisible by 16, 32-wide chunks, and
# 64-wide chunks (every D >= 64 compiles to the same code: D is a runtime loop bound; 2048 is the widest supported).
WIDTHS = (8, 32, 2048)
# The sigmoid terms' kernels at the widest variant only, to spare the suite 36 compilations: at widths 8 and 32 they
# were compiled once, without spills (at most 236 registers, bf16 / fp16 at width 8 on sm_80).
SIGMOID_WIDTHS = (2048,)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# In the inputs' dtype; every other buffer is fp32, int32 or int64.
EMBEDDING_POINTERS = ("emb_ptr", "ex_ptr", "ey_ptr", "s_img_ptr", "s_txt_ptr", "teacher_ptr")
INT_POINTERS = ("pair_ptr", "member_ptr")
INT64_POINTERS = ("table_ptr",)
FLOAT_SCALARS = ("inv_rows",)


def _signature(kernel, emb_dtype: str, constexprs: dict, width: int):
    """Signature and divisibility attributes as Triton's launcher would build them for 16-byte aligned tensors."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (emb_dtype if name in EMBEDDING_POINTERS else "i32" if name in INT_POINTERS
                                     else "i64" if name in INT64_POINTERS else "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
            if name == "width" and width % 16 == 0:  # the launcher marks a width divisible by 16
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def kernel_variants(cfg, dtype):
    """(kernel, constexprs, warps) for every kernel the host wrappers launch, each backward direction apart."""
    import kernels.triton_ensemble as ensemble
    import kernels.triton_fused as fused
    import kernels.triton_gd as gd

    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_FP32=False,
                  PRECISION="tf32x3" if str(dtype) == "torch.float32" else "ieee")
    passes = [{**common, "BLOCK_D": cfg.block_d, "ROWS": rows} for rows in (1, 0)]
    return [
        (fused._relational_fwd_kernel, common, cfg.forward_warps),
        *((fused._relational_bwd_kernel, c, cfg.backward_warps) for c in passes),
        (gd._gd_lse_kernel, common, cfg.forward_warps),
        *((gd._gd_products_kernel, c, cfg.backward_warps) for c in passes),
        (gd._gd_delta_kernel, common, cfg.backward_warps),
        *((gd._gd_backward_kernel, c, cfg.backward_warps) for c in passes),
        (ensemble._ensemble_jsd_kernel, {**common, "BLOCK_N": ensemble.block_n(cfg)}, cfg.forward_warps),
    ]


def sigmoid_variants(cfg, dtype):
    """(kernel, constexprs, warps) of the sigmoid terms' kernels, each backward direction apart."""
    import kernels.triton_sigmoid as sigmoid

    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_FP32=False,
                  PRECISION="tf32x3" if str(dtype) == "torch.float32" else "ieee")
    return [
        (sigmoid._sigmoid_fwd_kernel, common, cfg.forward_warps),
        *((sigmoid._sigmoid_bwd_kernel, {**common, "BLOCK_D": cfg.block_d, "ROWS": rows}, cfg.backward_warps)
          for rows in (1, 0)),
    ]


def _ptxas_report(ptx: str, capability: int) -> dict:
    """Registers and spill bytes of the kernel in ``ptx``, from ptxas -v with the flags Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = out.stderr + out.stdout
    registers = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    assert registers and stores and loads, f"unexpected ptxas report:\n{log}"
    return {"registers": int(registers.group(1)), "spill_stores": int(stores.group(1)),
            "spill_loads": int(loads.group(1))}


def _variants(dtype_name: str, width: int, family: str):
    """The block config and (kernel, constexprs, warps) list of one dtype, width and kernel family."""
    import torch

    from kernels.triton_config import block_config

    dtype = getattr(torch, dtype_name)
    cfg = block_config(width, dtype)
    return cfg, {"relational": kernel_variants, "sigmoid": sigmoid_variants}[family](cfg, dtype)


def _compile_one(task: tuple) -> dict:
    """Compile variant ``index`` of (dtype, width, family) for ``capability``; its row of the report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtype_name, width, family, index, capability = task
    cfg, variants = _variants(dtype_name, width, family)
    kernel, constexprs, warps = variants[index]
    tl_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype_name]
    signature, attrs = _signature(kernel, tl_dtype, constexprs, width)
    name = kernel.__name__ + ("" if "ROWS" not in constexprs else "[rows]" if constexprs["ROWS"] else "[cols]")
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": warps, "num_stages": cfg.num_stages},
    )
    return {"kernel": name, "dtype": dtype_name, "width": width, "sm": capability, "warps": warps,
            "shared_bytes": compiled.metadata.shared, **_ptxas_report(compiled.asm["ptx"], capability)}


def compile_report() -> list[dict]:
    """Compile every kernel variant for every target, one process per core; one row per (kernel, dtype, width,
    target), in that order."""
    import multiprocessing

    from kernels.triton_tiles import INTERPRETING

    assert not INTERPRETING, "compile_report must run without TRITON_INTERPRET=1"
    families = [(width, "relational") for width in WIDTHS] + [(width, "sigmoid") for width in SIGMOID_WIDTHS]
    tasks = [(dtype_name, width, family, index, capability)
             for dtype_name in DTYPES for width, family in families
             for index in range(len(_variants(dtype_name, width, family)[1])) for capability in TARGETS]
    # Forked workers (no GPU is involved) share the imported modules; each compile is single-threaded.
    with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, len(tasks))) as pool:
        return pool.map(_compile_one, tasks, chunksize=1)


def _format(rows: list[dict]) -> str:
    lines = [f"{'kernel':28} {'dtype':9} {'D':>5} {'sm':>3} {'warps':>5} {'regs':>5} {'spill st/ld':>12} {'shared':>7}"]
    for r in rows:
        lines.append(f"{r['kernel']:28} {r['dtype']:9} {r['width']:5d} {r['sm']:3d} {r['warps']:5d} "
                     f"{r['registers']:5d} {r['spill_stores']:>5d}/{r['spill_loads']:<6d} {r['shared_bytes']:7d}")
    return "\n".join(lines)


def test_kernels_compile_for_sm80_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "tests.test_triton_compile", "--json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    print("\n" + _format(rows))
    # 10 kernels and directions at every width (the ensemble's value kernel with them), the 3 of the sigmoid terms at
    # theirs
    assert len(rows) == (10 * len(WIDTHS) + 3 * len(SIGMOID_WIDTHS)) * len(DTYPES) * len(TARGETS)
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills:\n" + _format(spilled)
    # sm_80 has 164 KiB of shared memory per block (sm_90: 227 KiB); Triton fails to compile beyond, but be explicit.
    assert all(r["shared_bytes"] <= 164 * 1024 for r in rows)


if __name__ == "__main__":
    report = compile_report()
    print(json.dumps(report) if "--json" in sys.argv else _format(report))
