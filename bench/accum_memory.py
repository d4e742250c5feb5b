"""Memory and time of one optimizer step against the effective batch, plain vs --accum-freq (GradCache).

``python -m bench.accum_memory [--batches 256,512,...] [--micro 256] [--budget-gib 4]``

Each measurement is a fresh process that builds the engine's default student and loss (``clip-rd``, fused backend,
stored teacher rows), runs one warm-up step and one timed step of ``engine.training.step.train_step`` on random inputs,
and reports its peak resident memory (ru_maxrss) and the timed step's wall time. Plain runs take the effective
batch at once; accumulated runs take it in micro-batches of ``--micro``. Sizes whose plain run exceeded the
budget are not tried larger. Results: ``bench/results/accum/accum.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from engine.cli import HelpFormatter

DEFAULT_OUT = Path(__file__).parent / "results" / "accum"

_CHILD = r"""
import json, resource, sys, time, torch
from bench.test_engine import make_step
from engine.training.step import train_step
effective, micro = int(sys.argv[1]), int(sys.argv[2])
state, batch = make_step("precomputed", effective)
state.cfg.accum_freq = effective // micro
state.total_steps = 10
train_step(state, batch)
start = time.perf_counter()
train_step(state, batch)
seconds = time.perf_counter() - start
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "step_s": seconds}))
"""


def measure(effective: int, micro: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(effective), str(micro)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accum_memory", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--batches", default="256,512,1024,2048,4096,8192,16384",
                        help="effective batch sizes, comma-separated")
    parser.add_argument("--micro", type=int, default=256, help="micro-batch of the accumulated runs")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="process memory budget (GiB)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    args = parser.parse_args(argv)
    budget = args.budget_gib * 2**30
    rows, plain_over = [], False
    for effective in (int(b) for b in args.batches.split(",")):
        row = {"effective_batch": effective}
        if not plain_over:
            row["plain"] = measure(effective, effective)
            plain_over = "error" in row["plain"] or row["plain"]["peak_rss"] > budget
        if effective >= args.micro and effective % args.micro == 0:
            row["accum"] = measure(effective, args.micro)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if "accum" in row and ("error" in row["accum"] or row["accum"]["peak_rss"] > budget):
            break
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"micro_batch": args.micro, "budget_bytes": budget, "rows": rows, "cpus": os.cpu_count(),
               "student": "tiny-vit-student", "preset": "clip-rd", "backend": "auto (chunked on CPU)"}
    (out / "accum.json").write_text(json.dumps(summary, indent=1))
    lines = ["# One optimizer step: peak process memory and time against the effective batch", "",
             f"tiny-vit-student, clip-rd, fused loss, stored teacher rows; accumulated runs in micro-batches of "
             f"{args.micro} (--accum-freq = batch / {args.micro}). Peak RSS of a fresh process (ru_maxrss).", "",
             "| effective batch | plain: peak | plain: step | accumulated: peak | accumulated: step | step ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    gib = lambda r, k: f"{r[k]['peak_rss'] / 2**30:.2f} GiB" if k in r and "peak_rss" in r[k] else "-"  # noqa: E731
    sec = lambda r, k: f"{r[k]['step_s']:.2f} s" if k in r and "step_s" in r[k] else "-"  # noqa: E731
    for r in rows:
        ratio = (f"{r['accum']['step_s'] / r['plain']['step_s']:.2f}x"
                 if "step_s" in r.get("accum", {}) and "step_s" in r.get("plain", {}) else "-")
        lines.append(f"| {r['effective_batch']} | {gib(r, 'plain')} | {sec(r, 'plain')} | {gib(r, 'accum')} | "
                     f"{sec(r, 'accum')} | {ratio} |")
    (out / "accum.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'accum.md'}")


if __name__ == "__main__":
    main()
