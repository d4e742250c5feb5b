"""``python -m bench.report <benchmark.json> [--out DIR]``: Markdown table, derived figures and log-log plots.

Reads a ``pytest bench/ --benchmark-json=...`` file and writes, under ``bench/results/<cpu|gpu-name>/`` unless
``--out`` says otherwise: ``report.md`` (machine, one table per preset and mode, chunked vs reference ratios at
the largest N both ran, fitted memory-growth exponents), ``summary.json`` (the same figures, machine-readable),
``<preset>.png`` (time and memory vs N, log-log, one line per backend, one row per mode) and a copy of the input
as ``benchmark.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from collections import defaultdict
from pathlib import Path

from engine.cli import HelpFormatter
from engine.logger import pyplot

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("forward", "backward", "forward+backward")
BACKEND_ORDER = ("floor", "reference", "compiled", "chunked", "triton")
MiB = float(1 << 20)


def load(path: Path) -> tuple[list[dict], dict, dict]:
    """(records, machine description, run metadata) from a pytest-benchmark JSON file."""
    data = json.loads(Path(path).read_text())
    records = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        if "backend" not in info:
            continue
        stats = bench["stats"]
        records.append({**info, "median_s": stats["median"], "mean_s": stats["mean"], "min_s": stats["min"],
                        "stddev_s": stats["stddev"], "rounds": stats["rounds"]})
    machine = data.get("machine_info", {}).get("bench_machine", {})
    meta = {"datetime": data.get("datetime"), "version": data.get("version"),
            "engine": [b for b in data.get("benchmarks", []) if (b.get("extra_info") or {}).get("kind") == "engine"]}
    return records, machine, meta


def fit_exponent(points: dict[int, float]) -> float | None:
    """Least-squares slope of log(value) vs log(N) over the largest (up to 4) sizes with a positive value."""
    usable = sorted((n, v) for n, v in points.items() if v and v > 0)[-4:]
    if len(usable) < 2:
        return None
    xs = [math.log(n) for n, _ in usable]
    ys = [math.log(v) for _, v in usable]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def index(records: list[dict]) -> dict:
    """{(preset, mode): {backend: {n: record}}}."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for record in records:
        out[(record["preset"], record["mode"])][record["backend"]][record["n"]] = record
    return out


def analyse(records: list[dict]) -> dict:
    """Derived figures: memory/time exponents, x floor per case, chunked vs reference at the largest common N."""
    table = index(records)
    exponents, ratios = [], []
    for (preset, mode), backends in sorted(table.items()):
        for backend, by_n in sorted(backends.items(), key=lambda kv: _order(kv[0])):
            memory = fit_exponent({n: r["peak_extra_bytes"] for n, r in by_n.items()}) if backend != "floor" else None
            time = fit_exponent({n: r["median_s"] for n, r in by_n.items()})
            exponents.append({"preset": preset, "mode": mode, "backend": backend, "memory_exponent": memory,
                              "time_exponent": time, "ns": sorted(by_n)})
        for fast in ("chunked", "triton", "compiled"):
            if fast not in backends or "reference" not in backends:
                continue
            common = sorted(set(backends[fast]) & set(backends["reference"]))
            if not common:
                continue
            n = common[-1]
            a, b = backends[fast][n], backends["reference"][n]
            ratios.append({
                "preset": preset, "mode": mode, "backend": fast, "n": n,
                "time_s": a["median_s"], "reference_time_s": b["median_s"], "time_ratio": a["median_s"] / b["median_s"],
                "peak_extra_bytes": a["peak_extra_bytes"], "reference_peak_extra_bytes": b["peak_extra_bytes"],
                "memory_ratio": a["peak_extra_bytes"] / b["peak_extra_bytes"] if b["peak_extra_bytes"] > 0 else None,
            })
    return {"exponents": exponents, "ratios": ratios}


def floor_multiple(table: dict, record: dict) -> float | None:
    floor = table[(record["preset"], record["mode"])].get("floor", {}).get(record["n"])
    return record["median_s"] / floor["median_s"] if floor else None


def _order(backend: str) -> int:
    return BACKEND_ORDER.index(backend) if backend in BACKEND_ORDER else len(BACKEND_ORDER)


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def case_line(record: dict) -> str:
    """One finished case: weight set, mode, N, backend, time, peak extra memory, ratio to the reference, value check."""
    ratio = record.get("reference_ratio")
    if record["backend"] == "floor":
        versus = "the matmuls alone"
    else:
        versus = f"{ratio:.2f}x the reference's time" if ratio is not None else "no reference time at this size"
    peak = record["peak_extra_bytes"]
    memory = "-" if peak is None else f"{peak / MiB:.0f} MiB"
    return (f"{record['preset']} {record['mode']} N={record['n']} {record['backend']}: "
            f"{record['median_s']:.3f} s, peak extra memory {memory}, {versus}; "
            f"value check: {record.get('value_check', '-')}")


def summary_lines(records: list[dict]) -> list[str]:
    """Short text summary (also printed at the end of a pytest run)."""
    if not records:
        return []
    figures = analyse(records)
    lines = []
    for r in figures["ratios"]:
        mem = _fmt(r["memory_ratio"], ".3f")
        lines.append(
            f"{r['preset']} {r['mode']} N={r['n']}: {r['backend']} {r['time_s'] * 1e3:.1f} ms vs reference "
            f"{r['reference_time_s'] * 1e3:.1f} ms (x{r['time_ratio']:.2f} time), peak extra memory "
            f"{r['peak_extra_bytes'] / MiB:.1f} vs {r['reference_peak_extra_bytes'] / MiB:.1f} MiB (x{mem})"
        )
    for e in figures["exponents"]:
        if e["memory_exponent"] is not None and e["mode"] == "forward+backward":
            lines.append(
                f"{e['preset']} {e['mode']} {e['backend']}: memory ~ N^{e['memory_exponent']:.2f}, "
                f"time ~ N^{_fmt(e['time_exponent'], '.2f')} (N = {', '.join(map(str, e['ns'][-4:]))})"
            )
    return lines


def markdown(records: list[dict], machine: dict, meta: dict) -> str:
    table = index(records)
    figures = analyse(records)
    first = records[0] if records else {}
    out = ["# Benchmark results", ""]
    out.append(f"Run {meta.get('datetime') or '?'}; profile `{first.get('profile', '?')}`, device "
               f"{first.get('device', '?')}, dtype {first.get('dtype', '?')}, D = {first.get('d', '?')}, rows = N "
               "(single device).")
    out.append("")
    out.append("## Machine")
    out.append("")
    gpu = machine.get("gpu")
    out += [
        f"- CPU: {machine.get('cpu_model', '?')}, {machine.get('cpu_cores', '?')} cores "
        f"({machine.get('torch_threads', '?')} torch threads), {machine.get('memory_gib', '?')} GiB memory",
        f"- load average when the results were saved: {machine.get('load_average_1m', '?')} "
        f"(the machine is shared; a load above 2 "
        "means other work ran alongside and times are inflated)",
        f"- GPU: {gpu['name']} ({gpu['memory_gib']} GiB, sm {gpu['capability']}, CUDA {gpu['cuda']})" if gpu
        else "- GPU: none",
        f"- Python {machine.get('python', '?')}, torch {machine.get('torch', '?')}, "
        f"triton {machine.get('triton', '?')}",
        "",
    ]
    out += ["## Headline", ""]
    for r in figures["ratios"]:
        if r["mode"] != "forward+backward":
            continue
        out.append(
            f"- **{r['preset']}, forward+backward, N = {r['n']}** (largest N both ran): {r['backend']} "
            f"{r['time_s'] * 1e3:.1f} ms vs reference {r['reference_time_s'] * 1e3:.1f} ms "
            f"(**x{r['time_ratio']:.2f}** time); peak extra memory {r['peak_extra_bytes'] / MiB:.1f} MiB vs "
            f"{r['reference_peak_extra_bytes'] / MiB:.1f} MiB (**x{_fmt(r['memory_ratio'], '.3f')}**)"
        )
    out += ["", "Memory-growth exponents (log-log slope of peak extra memory vs N over the largest 4 sizes; "
            "materialising backends ~2, streamed ~1):", ""]
    out += ["| preset | mode | backend | memory exponent | time exponent | N fitted |", "|---|---|---|---|---|---|"]
    for e in figures["exponents"]:
        if e["backend"] == "floor":
            continue
        out.append(f"| {e['preset']} | {e['mode']} | {e['backend']} | {_fmt(e['memory_exponent'], '.2f')} | "
                   f"{_fmt(e['time_exponent'], '.2f')} | {', '.join(map(str, e['ns'][-4:]))} |")
    out += ["", "## All cases", "",
            "Time: median of the rounds. Memory: peak extra bytes above the inputs while the timed part ran. GFLOP/s: "
            "the objective's unavoidable matmul FLOPs (bench/flops.py, same count for every backend) per second. "
            "x floor: time over the floor provider's (the matmuls alone) at the same size.", ""]
    gpu_share = any(r.get("peak_share") for r in records)
    for (preset, mode), backends in sorted(table.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))):
        out += [f"### {preset}, {mode}", ""]
        header = "| N | backend | time (ms) | rounds | peak extra mem (MiB) | GFLOP/s | x floor |"
        rule = "|---|---|---|---|---|---|---|"
        if gpu_share:
            header += " share of device peak |"
            rule += "---|"
        out += [header, rule]
        rows = [(n, backend, r) for backend, by_n in backends.items() for n, r in by_n.items()]
        for n, backend, r in sorted(rows, key=lambda t: (t[0], _order(t[1]))):
            mem = "-" if backend == "floor" else f"{r['peak_extra_bytes'] / MiB:.1f}"
            line = (f"| {n} | {backend} | {r['median_s'] * 1e3:.2f} | {r['rounds']} | {mem} | "
                    f"{r['gflops_per_s']:.1f} | {_fmt(floor_multiple(table, r), '.2f')} |")
            if gpu_share:
                line += f" {_fmt(r.get('peak_share') and 100 * r['peak_share'], '.1f')}% |"
            out.append(line)
        out.append("")
    if meta.get("engine"):
        out += ["## Engine: training step", "", "| case | median step (ms) | rounds | notes |", "|---|---|---|---|"]
        for bench in meta["engine"]:
            info = bench["extra_info"]
            out.append(f"| {info.get('teacher', bench['name'])} | {bench['stats']['median'] * 1e3:.1f} | "
                       f"{bench['stats']['rounds']} | {info.get('notes', '')} |")
        out.append("")
    return "\n".join(out)


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []

    table = index(records)
    written = []
    for preset in sorted({r["preset"] for r in records}):
        modes = [m for m in MODES if (preset, m) in table]
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
        for row, mode in enumerate(modes):
            backends = table[(preset, mode)]
            for col, (field, label, scale) in enumerate(
                (("median_s", "time per call (ms)", 1e3), ("peak_extra_bytes", "peak extra memory (MiB)", 1 / MiB))
            ):
                ax = axes[row][col]
                for backend in sorted(backends, key=_order):
                    if field == "peak_extra_bytes" and backend == "floor":
                        continue
                    by_n = sorted(backends[backend].items())
                    ax.plot([n for n, _ in by_n], [r[field] * scale for _, r in by_n], marker="o", label=backend,
                            linestyle="--" if backend == "floor" else "-")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (batch = rows = columns)")
                ax.set_ylabel(label)
                ax.set_title(f"{preset}, {mode}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{preset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def default_out_dir(records: list[dict], machine: dict) -> Path:
    gpu = machine.get("gpu")
    if gpu:
        return RESULTS / ("gpu-" + re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-"))
    return RESULTS / ("quick" if records and records[0].get("profile") == "quick" else "cpu")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("json", type=Path, help="a pytest --benchmark-json file of bench/")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: bench/results/<device>)")
    args = parser.parse_args(argv)
    if not args.json.is_file():
        parser.error(f"{args.json}: no such file (run: pytest bench/ --benchmark-only --benchmark-json={args.json})")
    records, machine, meta = load(args.json)
    if not records and not meta["engine"]:
        parser.error(f"{args.json}: holds no bench/ benchmark results (no extra_info with a backend)")
    out_dir = args.out or default_out_dir(records, machine)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(markdown(records, machine, meta) + "\n")
    summary = {"machine": machine, **analyse(records), "cases": [
        {**r, "x_floor": floor_multiple(index(records), r)} for r in records]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plots = plot(records, out_dir) if records else []
    if args.json.resolve() != (out_dir / "benchmark.json").resolve():
        shutil.copyfile(args.json, out_dir / "benchmark.json")
    print(f"wrote {out_dir / 'report.md'}, {out_dir / 'summary.json'}, " + ", ".join(str(p) for p in plots))
    for line in summary_lines(records):
        print(line)


if __name__ == "__main__":
    main()
