"""Where the chunked backend's time goes: ``python -m bench.profile_chunked [--ns 4096,8192] [--presets ...]``.

Runs one forward + backward of ``clip_rd_loss(backend="chunked")`` under ``torch.profiler`` (after a warm-up call)
and groups the self CPU time of every aten operator into the categories the objective is made of:

- products: the (rows x D) @ (D x N) matmuls (mm, addmm, matmul, vdot excluded);
- softmax: log-softmax and exp passes over the (rows x N) tiles;
- element-wise: scale, subtract, masks, scatter into the positive column, dA assembly;
- reductions: Frobenius dots (vdot), row sums, logsumexp outside log_softmax;
- copies and allocation: contiguous, to, copy_, zeros, empty, cat, index.

Writes ``bench/results/profile/chunked-profile.json`` and ``.md`` (one table per preset and N, with the matmul floor
of bench.flops for reference). Pure CPU tool: threads = ``torch.get_num_threads()``.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from engine.cli import HelpFormatter
from kernels import clip_rd_loss

from .cases import FloorCase, make_inputs, run_once

CATEGORIES = {
    "products": ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::addmm_"),
    "softmax": ("aten::_log_softmax", "aten::log_softmax", "aten::exp", "aten::exp_", "aten::_softmax",
                "aten::softmax", "aten::_log_softmax_backward_data", "aten::_softmax_backward_data"),
    "reductions": ("aten::vdot", "aten::dot", "aten::sum", "aten::logsumexp", "aten::mean", "aten::amax",
                   "aten::max"),
    "copies": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::zeros",
               "aten::zeros_like", "aten::empty", "aten::empty_like", "aten::cat", "aten::stack", "aten::fill_",
               "aten::zero_", "aten::index", "aten::select", "aten::slice", "aten::view", "aten::t",
               "aten::transpose", "aten::as_strided", "aten::arange", "aten::empty_strided", "aten::resize_"),
}
DEFAULT_OUT = Path(__file__).parent / "results" / "profile"


def categorise(name: str) -> str:
    for category, names in CATEGORIES.items():
        if name in names:
            return category
    return "element-wise"


def profile_case(preset: str, n: int, d: int) -> dict:
    inputs = make_inputs(n, d, torch.float32, "cpu")
    args = [inputs[k] for k in ("s_img", "s_txt", "t_img", "t_txt")]
    scales = {k: inputs[k] for k in ("student_scale", "teacher_scale", "lam_img", "lam_txt", "kappa")}

    def step():
        for t in args[:2]:
            t.grad = None
        clip_rd_loss(*args, **scales, weights=preset, backend="chunked")["total"].backward()

    step()  # warm-up
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    floor = FloorCase(preset, inputs)
    run_once(floor, "forward+backward", "cpu")
    floor_s = min(run_once(floor, "forward+backward", "cpu")[0] for _ in range(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    by_category, by_op = defaultdict(float), defaultdict(float)
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        by_op[event.key] += seconds
        by_category[categorise(event.key)] += seconds
    profiled = sum(by_category.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"preset": preset, "n": n, "d": d, "threads": torch.get_num_threads(), "wall_s": wall,
            "floor_s": floor_s, "x_floor": wall / floor_s, "profiled_s": profiled,
            "categories": {k: by_category[k] for k in ("products", "softmax", "element-wise", "reductions", "copies")},
            "top_ops": top}


def markdown(records: list[dict]) -> str:
    lines = ["# Where the chunked backend's time goes", "",
             "One forward + backward of `clip_rd_loss(backend=\"chunked\")`, fp32, CPU, self time per aten operator "
             "(torch.profiler) grouped by category; `floor` is bench.cases.FloorCase, the unavoidable products alone.",
             ""]
    for r in records:
        lines += [f"## {r['preset']}, N = {r['n']}, D = {r['d']}, {r['threads']} threads", "",
                  f"wall {r['wall_s']:.2f} s (unprofiled), floor {r['floor_s']:.2f} s, "
                  f"**x{r['x_floor']:.2f} floor**", "",
                  "| category | seconds | share |", "| --- | --- | --- |"]
        for category, seconds in r["categories"].items():
            lines.append(f"| {category} | {seconds:.3f} | {seconds / r['profiled_s']:.0%} |")
        lines += ["", "Top operators: " + ", ".join(f"`{name}` {s:.3f} s" for name, s in r["top_ops"][:8]), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_chunked", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--ns", default="4096,8192", help="comma-separated batch sizes N")
    parser.add_argument("--presets", default="clip-rd,clip-kd", help="comma-separated loss presets")
    parser.add_argument("--d", type=int, default=512, help="embedding width D")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder for the JSON and Markdown files")
    args = parser.parse_args(argv)
    records = []
    for preset in args.presets.split(","):
        for n in (int(v) for v in args.ns.split(",")):
            records.append(profile_case(preset, n, args.d))
            r = records[-1]
            print(f"{preset} N={n}: {r['wall_s']:.2f} s, x{r['x_floor']:.2f} floor, "
                  + ", ".join(f"{k} {v:.2f}s" for k, v in r["categories"].items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunked-profile.json").write_text(json.dumps(records, indent=1))
    (out / "chunked-profile.md").write_text(markdown(records))
    print(f"wrote {out / 'chunked-profile.md'}")


if __name__ == "__main__":
    main()
