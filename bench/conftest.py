"""pytest options and hooks of the benchmark suite: ``--bench-quick``, the machine description, a closing summary."""
from __future__ import annotations

import os

from .config import QUICK_ENV


def pytest_addoption(parser):
    parser.addoption(
        "--bench-quick", action="store_true", default=False,
        help=f"CI-sized benchmark run (tiny sizes, one round); same as {QUICK_ENV}=1",
    )


def pytest_configure(config):
    if config.getoption("--bench-quick", default=False):
        os.environ[QUICK_ENV] = "1"  # before bench.config.profile() is first read, at collection


def pytest_benchmark_update_machine_info(config, machine_info):
    from .machine import describe

    machine_info["bench_machine"] = describe()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Skipped sizes with their reasons, then memory exponents and chunked/reference ratios of this run."""
    from .report import summary_lines

    session = getattr(config, "_benchmarksession", None)
    benchmarks = [bench for bench in getattr(session, "benchmarks", []) if getattr(bench, "extra_info", None)]
    skipped = terminalreporter.stats.get("skipped", [])
    if not benchmarks and not skipped:
        return
    terminalreporter.section("bench summary")
    from .config import profile

    prof = profile()
    terminalreporter.write_line(
        f"profile {prof.name}: device {prof.device}, dtype {str(prof.dtype).removeprefix('torch.')}, D={prof.d}"
    )
    for report in skipped:
        if "test_loss" in report.nodeid or "test_engine" in report.nodeid:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            terminalreporter.write_line(f"skipped {report.nodeid.split('::')[-1]}: {reason.removeprefix('Skipped: ')}")
    records = [
        {**bench.extra_info, "median_s": bench.stats.median, "mean_s": bench.stats.mean}
        for bench in benchmarks
        if getattr(bench, "stats", None) is not None and "backend" in bench.extra_info
    ]
    for line in summary_lines(records):
        terminalreporter.write_line(line)
