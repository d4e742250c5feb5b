"""pytest options and hooks of the benchmark suite: ``--bench-profile``/``--bench-quick``, the machine description,
one line per finished case, a closing summary."""
from __future__ import annotations

import os

from .config import PROFILE_ENV, PROFILES, QUICK_ENV

_TERMINAL = []  # the terminal reporter, once configured


def pytest_addoption(parser):
    parser.addoption(
        "--bench-profile", choices=PROFILES, default=None,
        help=f"default: every backend and preset, forward+backward, N to 8192 on CPU (about 12 min on 2 cores), GPU "
             f"sizes on CUDA; full: every mode and the long sweep (N to 16384 on CPU); quick: tiny sizes (same as "
             f"{PROFILE_ENV}=...)",
    )
    parser.addoption(
        "--bench-quick", action="store_true", default=False,
        help=f"CI-sized benchmark run (tiny sizes, one round); same as --bench-profile quick or {QUICK_ENV}=1",
    )


def pytest_configure(config):
    # before bench.config.profile() is first read, at collection
    if config.getoption("--bench-quick", default=False):
        os.environ[QUICK_ENV] = "1"
    if config.getoption("--bench-profile", default=None):
        os.environ[PROFILE_ENV] = config.getoption("--bench-profile")


def pytest_sessionstart(session):
    _TERMINAL[:] = [session.config.pluginmanager.get_plugin("terminalreporter")]


def pytest_runtest_logreport(report):
    """Print a finished benchmark case's line (recorded by bench/test_loss.py) as soon as it is done."""
    if report.when != "call" or not _TERMINAL or _TERMINAL[0] is None:
        return
    terminal = _TERMINAL[0]
    for name, value in report.user_properties:
        if name == "bench_line":
            if getattr(terminal._tw, "width_of_current_line", 0):  # after the progress dots
                terminal.write("\n")
            terminal.write_line(value)


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
