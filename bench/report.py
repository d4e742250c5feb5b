"""``python -m bench.report <benchmark.json> [--out DIR]``: Markdown table, derived figures and log-log plots.

Reads a ``pytest bench/ --benchmark-json=...`` file and writes, under ``bench/results/<cpu|gpu-name>/`` unless
``--out`` says otherwise: ``report.md`` (machine, one table per preset and mode, chunked vs reference ratios at
the largest N both ran, fitted memory-growth exponents), ``summary.json`` (the same figures, machine-readable),
``<preset>.png`` (time and memory vs N, log-log, one line per backend, one row per mode) and a copy of the input
as ``benchmark.json``. The input is checked whole before any file is written; then every file is written, or none.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from engine.cli import HelpFormatter
from engine.training.logger import pyplot

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("forward", "backward", "forward+backward")
BACKEND_ORDER = ("floor", "reference", "compiled", "chunked", "triton")
MiB = float(1 << 20)


class ReportError(ValueError):
    """A benchmark file or output folder this report cannot use, described in one line."""


def load(path: Path) -> tuple[list[dict], dict, dict]:
    """(records, machine description, run metadata) from a pytest-benchmark JSON file, checked whole first."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportError(f"{path}: not a readable JSON file ({exc})") from exc
    problem = _file_problem(data)
    if problem:
        raise ReportError(f"{path}: {problem} (expected a pytest --benchmark-json file of bench/)")
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


def _number(value, positive: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > 0 if positive else value >= 0))


def _file_problem(data) -> str | None:
    """What is wrong with the file's structure, naming the first bad entry (None: nothing)."""
    if not isinstance(data, dict):
        return f"holds a {type(data).__name__}, not an object"
    if not isinstance(data.get("benchmarks", []), list):
        return "'benchmarks' is not a list"
    machine = data.get("machine_info", {})
    if not isinstance(machine, dict) or not isinstance(machine.get("bench_machine", {}), dict):
        return "'machine_info.bench_machine' is not an object"
    gpu = machine.get("bench_machine", {}).get("gpu")
    if gpu is not None and not (isinstance(gpu, dict) and {"name", "memory_gib", "capability", "cuda"} <= set(gpu)
                                and isinstance(gpu["name"], str)):
        return "'machine_info.bench_machine.gpu' lacks name, memory_gib, capability or cuda"
    for number, bench in enumerate(data.get("benchmarks", [])):
        problem = _bench_problem(bench)
        if problem:
            name = bench.get("name") if isinstance(bench, dict) else None
            return f"benchmark {number}" + (f" ({name})" if name else "") + f": {problem}"
    return None


def _bench_problem(bench) -> str | None:
    if not isinstance(bench, dict) or not isinstance(bench.get("extra_info") or {}, dict):
        return "not an object with an extra_info object"
    info = bench.get("extra_info") or {}
    if "backend" not in info and info.get("kind") != "engine":
        return None  # not a bench/ result: left out of the report
    stats = bench.get("stats")
    if not isinstance(stats, dict):
        return "no stats"
    if not _number(stats.get("median"), positive=True):
        return f"stats.median {stats.get('median')!r} is not a positive number"
    bad = [key for key in ("mean", "min", "stddev") if not _number(stats.get(key))]
    if bad or not isinstance(stats.get("rounds"), int):
        return f"stats.{(bad or ['rounds'])[0]} is missing or not a number"
    if "backend" not in info:
        return None if "teacher" in info or "name" in bench else "an engine entry without teacher or name"
    if not all(isinstance(info.get(key), str) for key in ("backend", "preset")):
        return "extra_info lacks backend or preset"
    if info.get("mode") not in MODES:
        return f"extra_info.mode {info.get('mode')!r} is not one of {MODES}"
    if not isinstance(info.get("n"), int) or info["n"] < 1:
        return f"extra_info.n {info.get('n')!r} is not a positive integer"
    if not _number(info.get("gflops_per_s")):
        return f"extra_info.gflops_per_s {info.get('gflops_per_s')!r} is not a number"
    if info["backend"] != "floor" and not _number(info.get("peak_extra_bytes")):
        return f"extra_info.peak_extra_bytes {info.get('peak_extra_bytes')!r} is not a number"
    if info.get("peak_share") is not None and not _number(info["peak_share"]):
        return f"extra_info.peak_share {info['peak_share']!r} is not a number"
    return None


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


def write_report(out_dir: Path, files: dict[str, str], records: list[dict]) -> list[Path]:
    """Every file into a staging folder in ``out_dir`` first, then renamed into place: all of them or none."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
        try:
            for name, text in files.items():
                (staging / name).write_text(text)
            plots = plot(records, staging) if records else []
            for path in staging.iterdir():
                os.replace(path, out_dir / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise ReportError(f"--out {out_dir}: could not write the report ({exc.strerror or exc})") from exc
    return [out_dir / path.name for path in plots]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("json", type=Path, help="a pytest --benchmark-json file of bench/")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: bench/results/<device>)")
    args = parser.parse_args(argv)
    try:
        if not args.json.is_file():
            reason = "not a file" if args.json.exists() else "no such file"
            raise ReportError(f"{args.json}: {reason} (run: pytest bench/ --benchmark-only "
                              f"--benchmark-json={args.json})")
        records, machine, meta = load(args.json)
        if not records and not meta["engine"]:
            raise ReportError(f"{args.json}: holds no bench/ benchmark results (no extra_info with a backend)")
        out_dir = args.out or default_out_dir(records, machine)
        summary = {"machine": machine, **analyse(records), "cases": [
            {**r, "x_floor": floor_multiple(index(records), r)} for r in records]}
        files = {"report.md": markdown(records, machine, meta) + "\n",
                 "summary.json": json.dumps(summary, indent=1) + "\n", "benchmark.json": args.json.read_text()}
        plots = write_report(out_dir, files, records)
    except ReportError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {out_dir / 'report.md'}, {out_dir / 'summary.json'}, " + ", ".join(str(p) for p in plots))
    for line in summary_lines(records):
        print(line)


if __name__ == "__main__":
    main()
