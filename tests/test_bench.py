"""The benchmark suite's own checks: FLOP counts, memory probe, size limits, report, and a quick run end to end."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import flops, memory, report

REPO = Path(__file__).resolve().parent.parent


def test_clip_rd_counts_24_products_by_hand():
    # Views of kernels/README.md's products table in both directions: 6 pairs x 2 = 12 forward products;
    # gradient products:
    # S_I S_T^T and S_T S_I^T have two student operands (4), the four teacher-student pairs one each in both
    # directions (8), T_I T_T^T is a KD target only (0).
    products = flops.products("clip-rd")
    assert sum(p.kind == "forward" for p in products) == 12
    assert sum(p.kind != "forward" for p in products) == 12
    assert ("t_img", "t_txt") in {(p.anchor, p.candidate) for p in products if p.kind == "forward"}
    assert not [p for p in products if p.kind != "forward" and {p.anchor, p.candidate} == {"t_img", "t_txt"}]
    assert flops.flop_count("clip-rd", "forward+backward", 37, 129, 24) == 24 * 2 * 37 * 129 * 24
    assert flops.flop_count("clip-rd", "backward", 5, 7, 3) == 12 * 2 * 5 * 7 * 3


def test_clip_kd_and_baseline_counts():
    # clip-kd: task/hrd views S_I S_T^T both ways (2 student operands each), icl S_I T_T^T and S_T T_I^T (1 each),
    # hrd targets T_I T_T^T both ways (forward only).
    assert len(flops.mode_products("clip-kd", "forward")) == 6
    assert len(flops.mode_products("clip-kd", "backward")) == 6
    assert len(flops.mode_products("baseline", "forward")) == 2
    assert len(flops.mode_products("baseline", "backward")) == 4
    with pytest.raises(ValueError, match="mode"):
        flops.mode_products("clip-kd", "sideways")


def test_bytes_figures():
    assert flops.bytes_min("forward", 8, 8, 4, 4) == 4 * 8 * 4 * 4
    assert flops.bytes_min("forward+backward", 8, 8, 4, 2) == (4 + 6) * 8 * 4 * 2
    assert flops.bytes_logits("clip-kd", "forward", 3, 5) == 6 * 2 * 4 * 3 * 5


@pytest.mark.parametrize("exponent", [1.0, 2.0, 1.5])
def test_fit_exponent_recovers_power_law(exponent):
    points = {n: 3.0 * n**exponent for n in (256, 512, 1024, 2048, 4096)}
    assert report.fit_exponent(points) == pytest.approx(exponent, abs=1e-9)
    assert report.fit_exponent({256: 1.0}) is None


def test_limit_reason_memory_then_time():
    gib = 1 << 30
    reason = memory.limit_reason("reference", "clip-rd", "forward", 8192, 512, 4, {4096: 3 * gib}, {}, 8 * gib, 0)
    assert reason and "12.0 GiB" in reason and "out of memory" in reason
    reason = memory.limit_reason("chunked", "clip-rd", "forward", 8192, 512, 4, {4096: 1 << 20}, {4096: 10.0},
                                 8 * gib, 25.0)
    assert reason and "40 s per call" in reason
    assert memory.limit_reason("chunked", "clip-rd", "forward", 8192, 512, 4, {4096: 1 << 20}, {4096: 1.0},
                               8 * gib, 25.0) is None


def test_probe_sees_quadratic_reference_and_small_chunked():
    budget_fraction = 0.5
    ref = memory.probe_cpu("reference", "clip-kd", [512, 1024], ["forward+backward"], 32, torch.float32,
                           budget_fraction, 0)
    chunked = memory.probe_cpu("chunked", "clip-kd", [1024], ["forward+backward"], 32, torch.float32,
                               budget_fraction, 0)
    small, large = ref[(512, "forward+backward")], ref[(1024, "forward+backward")]
    streamed = chunked[(1024, "forward+backward")]
    assert small["status"] == large["status"] == streamed["status"] == "ok", (ref, chunked)
    matrix = 1024 * 1024 * 4  # one fp32 N x N matrix; the reference holds many at once
    assert large["peak_extra_bytes"] > 4 * matrix
    assert large["peak_extra_bytes"] > 2.5 * small["peak_extra_bytes"]  # ~4x when N doubles
    assert streamed["peak_extra_bytes"] < large["peak_extra_bytes"] / 1.5  # one row block of tiles vs all matrices


def _fake_benchmark(backend, n, seconds, peak, mode="forward+backward"):
    return {
        "name": f"test_loss[{backend}-{n}]", "group": f"clip-rd | {mode} | N={n}",
        "stats": {"median": seconds, "mean": seconds, "min": seconds, "stddev": 0.0, "rounds": 3},
        "extra_info": {"backend": backend, "preset": "clip-rd", "mode": mode, "n": n, "rows": n, "d": 512,
                       "dtype": "float32", "device": "cpu", "profile": "cpu", "peak_extra_bytes": peak,
                       "flops": flops.flop_count("clip-rd", mode, n, n, 512),
                       "gflops_per_s": flops.flop_count("clip-rd", mode, n, n, 512) / seconds / 1e9},
    }


def test_report_on_known_figures(tmp_path):
    ns = (512, 1024, 2048, 4096)
    benches = []
    for n in ns:
        k = (n / 512) ** 2
        benches.append(_fake_benchmark("floor", n, 0.01 * k, 1))
        benches.append(_fake_benchmark("reference", n, 0.08 * k, int(64 * k) << 20))
        if n < 4096:
            benches.append(_fake_benchmark("chunked", n, 0.02 * k, (n // 512) << 20))
    data = {"benchmarks": benches, "datetime": "2026-01-01T00:00:00",
            "machine_info": {"bench_machine": {"cpu_model": "Test CPU", "cpu_cores": 2, "memory_gib": 24.0}}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    report.main([str(path), "--out", str(out)])
    text = (out / "report.md").read_text()
    assert "Test CPU, 2 cores" in text
    # Largest N both ran is 2048: chunked 0.02*16 s vs reference 0.08*16 s, 4 MiB vs 1024 MiB.
    assert "N = 2048** (largest N both ran): chunked 320.0 ms vs reference 1280.0 ms (**x0.25** time)" in text
    assert "4.0 MiB vs 1024.0 MiB (**x0.004**)" in text
    assert "| clip-rd | forward+backward | reference | 2.00 | 2.00 |" in text
    assert "| clip-rd | forward+backward | chunked | 1.00 | 2.00 |" in text
    assert "| 2048 | chunked | 320.00 | 3 | 4.0 |" in text and "| 2.00 |" in text  # 2x the floor
    summary = json.loads((out / "summary.json").read_text())
    assert {r["backend"] for r in summary["ratios"]} == {"chunked"}
    png = out / "clip-rd.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_quick_suite_and_report_run(tmp_path):
    """A slice of ``pytest bench/ --bench-quick`` runs, records memory and FLOPs, and the report reads it."""
    result_json = tmp_path / "quick.json"
    # a pytest of its own, not a worker of this one's pytest-xdist (which disables pytest-benchmark)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"BENCH_QUICK": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "bench/test_loss.py", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "--bench-quick",
           "-k", "clip-kd-forward+backward-N128 and not compiled", f"--benchmark-json={result_json}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bench summary" in proc.stdout
    # one line per case as it finishes, with its value checked against the reference's
    assert re.search(r"clip-kd forward\+backward N=128 chunked: [\d.]+ s, peak extra memory \d+ MiB, [\d.]+x the "
                     r"reference's time; value check: reference \(relative error", proc.stdout), proc.stdout[-3000:]
    records, machine, _ = report.load(result_json)
    assert {r["backend"] for r in records} == {"floor", "reference", "chunked"}
    assert machine["cpu_cores"] == os.cpu_count()
    for r in records:
        assert r["flops"] == flops.flop_count("clip-kd", "forward+backward", 128, 128, 32)
        assert r["gflops_per_s"] > 0 and r["median_s"] > 0
        if r["backend"] != "floor":
            assert r["peak_extra_bytes"] > 0
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "bench.report", str(result_json), "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    assert "clip-kd, forward+backward" in (out / "report.md").read_text()
    assert (out / "clip-kd.png").exists()


def test_value_ledger_fails_a_wrong_backend():
    from bench.cases import ValueLedger

    ledger = ValueLedger()
    assert ledger.check("floor", "clip-rd", 64, None, torch.float32)["value_check"].startswith("none")
    assert "first value" in ledger.check("reference", "clip-rd", 64, 10.0, torch.float32)["value_check"]
    assert ledger.check("chunked", "clip-rd", 64, 10.0 + 1e-5, torch.float32)["value_error"] == pytest.approx(1e-6)
    with pytest.raises(AssertionError, match="compiled loss 10.01 differs from reference's 10.0"):
        ledger.check("compiled", "clip-rd", 64, 10.01, torch.float32)
    with pytest.raises(AssertionError, match="relative error"):
        ledger.check("triton", "clip-rd", 64, float("nan"), torch.bfloat16)
    # where the reference did not run, the chunked backend's value is the ground truth
    ledger.check("chunked", "clip-rd", 65536, 5.0, torch.bfloat16)
    assert ledger.check("triton", "clip-rd", 65536, 5.02, torch.bfloat16)["value_check"].startswith("chunked")
    with pytest.raises(AssertionError):
        ledger.check("triton", "clip-rd", 65536, 5.5, torch.bfloat16)


def test_gd_floor_products_by_hand():
    # clip-kd's 6 views already hold gd's four logit views; gd adds R Y and R^T X per view (8 forward), and per
    # student direction two upstream products and four gradient products (12 backward).
    assert len(flops.mode_products("clip-kd+gd", "forward")) == 6 + 8
    assert len(flops.mode_products("clip-kd+gd", "backward")) == 6 + 12


def _report_refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        report.main([str(a) for a in argv])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert capsys.readouterr().err == ""  # no usage line
    return message


def _good_report_input() -> dict:
    return {"benchmarks": [_fake_benchmark("floor", 512, 0.01, 1), _fake_benchmark("reference", 512, 0.08, 1 << 20),
                           _fake_benchmark("reference", 1024, 0.3, 4 << 20)]}


def _broken(change):
    data = _good_report_input()
    change(data["benchmarks"][1])
    return json.dumps(data)


@pytest.mark.parametrize("content, expected", [
    ("", "not a readable JSON file"), ("hello", "not a readable JSON file"), ('{"benchmarks": [', "not a readable"),
    (b"\x89\xeb\x00", "not a readable JSON file"), ("[]", "holds a list, not an object"),
    ('{"benchmarks": "x"}', "'benchmarks' is not a list"),
    (_broken(lambda b: b.pop("stats")), "benchmark 1 (test_loss[reference-512]): no stats"),
    (_broken(lambda b: b["extra_info"].pop("preset")), "benchmark 1 (test_loss[reference-512]): extra_info lacks"),
    (_broken(lambda b: b["stats"].update(median="fast")), "stats.median 'fast' is not a positive number"),
    (_broken(lambda b: b["stats"].update(median=0)), "stats.median 0 is not a positive number"),
    (_broken(lambda b: b["stats"].update(median=float("nan"))), "stats.median nan is not a positive number"),
    (_broken(lambda b: b["extra_info"].update(mode="sideways")), "extra_info.mode 'sideways' is not one of"),
    (_broken(lambda b: b["extra_info"].update(peak_extra_bytes=None)), "peak_extra_bytes None is not a number"),
])
def test_report_refuses_malformed_input_before_writing(tmp_path, capsys, content, expected):
    path = tmp_path / "bench.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = _report_refused([path, "--out", tmp_path / "out"], capsys)
    assert f"{path}: " in message and expected in message, message
    assert not (tmp_path / "out").exists()


def test_report_refuses_bad_paths_in_one_line(tmp_path, capsys):
    good = tmp_path / "bench.json"
    good.write_text(json.dumps(_good_report_input()))
    assert "no such file" in _report_refused([tmp_path / "missing.json"], capsys)
    assert f"{tmp_path}: not a file" in _report_refused([tmp_path], capsys)
    afile = tmp_path / "afile"
    afile.write_text("")
    assert f"--out {afile}: exists and is not a folder" in _report_refused([good, "--out", afile], capsys)
    assert f"--out {afile / 'x'}: could not write the report" in _report_refused([good, "--out", afile / "x"], capsys)


def test_report_writes_all_files_or_none(tmp_path, capsys, monkeypatch):
    good = tmp_path / "bench.json"
    good.write_text(json.dumps(_good_report_input()))
    out = tmp_path / "out"

    def fail(records, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot", fail)
    assert f"--out {out}: could not write the report (No space left" in _report_refused([good, "--out", out], capsys)
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    report.main([str(good), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "clip-rd.png", "report.md", "summary.json"]
