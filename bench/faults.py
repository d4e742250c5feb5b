"""Kill -9 at random points, resume, compare: ``python -m bench.faults [--trials 5] [--seed 0] [--out [FILE]]``.

On a small procedural dataset (engine.synthetic, in a temporary folder that also holds the cache), each trial runs
engine.precompute and engine.train (their ``main``, as ``python -m`` does) each in a process of its own, kills it
with SIGKILL at a random moment of its work (from its first output file, uniformly over the duration of an
uninterrupted run; seeded by --seed), resumes it (engine.precompute again, engine.train --resume latest, or anew
when it was killed before its first checkpoint) and compares the result with the uninterrupted run: the store's
arrays identical, the final weights and every epoch_K.pt bit-identical, every epoch_K.pt present, no temporary file
left. It prints one row per trial and command, writes the rows as JSON with --out (default file:
bench/results/faults/faults.json), and exits 1 if any check failed. (At exit Python's resource tracker may warn of
"leaked semaphore objects": those of the killed processes, which it removes.)
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.cli import HelpFormatter, run_command
from engine.core.errors import ConfigError
from engine.core.io import TEMP_NAME, atomic_write_json, check_writable_file
from engine.data.synthetic import SyntheticSpec, build

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "faults" / "faults.json"
START_TIMEOUT_S = 300  # a killed process that shows no sign of work by then has failed to start


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--trials", type=int, default=5, help="kills of each command (each resumed and compared)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--samples", type=int, default=96, help="training samples of the procedural dataset")
    p.add_argument("--shard-size", type=int, default=32, help="samples per shard (a store part per shard)")
    p.add_argument("--batch-size", type=int, default=16, help="engine.train's and engine.precompute's batch size")
    p.add_argument("--epochs", type=int, default=3, help="engine.train's epochs (an epoch_K.pt after each)")
    p.add_argument("--out", nargs="?", const=str(DEFAULT_OUT), default=None,
                   help=f"write the rows as JSON to this file (without a value: {DEFAULT_OUT})")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data, stores, runs, logs)")
    return p


class Setup:
    """The folder, the data and the command lines of one session of trials."""

    def __init__(self, folder: Path, args: argparse.Namespace):
        self.folder, self.args = folder, args
        spec = SyntheticSpec(train_samples=args.samples, val_samples=args.shard_size, shard_size=args.shard_size,
                             seed=7)
        self.train_data = build(folder / "data", spec, progress=False)["train"]
        self.cache = folder / "cache"

    def precompute_argv(self, store: Path) -> list[str]:
        return ["--train-data", self.train_data, "--teacher-store", str(store), "--batch-size",
                str(self.args.batch_size), "--cache-dir", str(self.cache)]

    def train_argv(self, name: str) -> list[str]:
        return ["--train-data", self.train_data, "--teacher-store", str(self.folder / "store-reference"),
                "--batch-size", str(self.args.batch_size), "--epochs", str(self.args.epochs), "--warmup", "2",
                "--logs", str(self.folder / "logs"), "--name", name, "--no-eval", "--no-progress",
                "--cache-dir", str(self.cache)]


def child(module: str, argv: list[str], log: str) -> None:
    """A command's ``main`` in a process of its own, its output to ``log`` (what ``python -m module`` runs)."""
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1), os.dup2(handle.fileno(), 2)
    importlib.import_module(module).main(argv)


def launch(processes, module: str, argv: list[str], marker: Path, log: Path):
    """Start ``module``'s command in a process; returns it once ``marker`` exists (its work has begun) or it ended,
    with that moment."""
    process = processes.Process(target=child, args=(module, argv, str(log)))
    process.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not marker.exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return process, time.monotonic()


def uninterrupted(processes, module: str, argv: list[str], marker: Path, log: Path) -> float:
    """Run ``module``'s command to its end; seconds from ``marker`` to the end (the window kills are drawn from)."""
    process, started = launch(processes, module, argv, marker, log)
    process.join()
    if process.exitcode != 0:
        tail = " | ".join(log.read_text().splitlines()[-5:])
        raise RuntimeError(f"the uninterrupted {module} failed (exit status {process.exitcode}): {tail}")
    return time.monotonic() - started


def kill_at_random(processes, module: str, argv: list[str], marker: Path, work_s: float, rng: random.Random,
                   log: Path) -> dict:
    """Start ``module``'s command; once ``marker`` exists, wait a random part of ``work_s`` and SIGKILL it. Returns
    when it was killed and whether it was still running."""
    delay = rng.uniform(0, work_s)
    process, _ = launch(processes, module, argv, marker, log)
    time.sleep(delay)
    running = process.is_alive()
    if running:
        os.kill(process.pid, signal.SIGKILL)
    process.join()
    return {"kill_after_s": round(delay, 3), "killed": running, "exit_status": process.exitcode}


def temporaries(folder: Path) -> list[str]:
    """Temporary files or folders (engine.core.io's ``.<name>.tmp<pid>``) anywhere under ``folder``."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*.tmp*") if TEMP_NAME.fullmatch(path.name))


def store_differences(store: Path, reference: Path) -> list[str]:
    """The store's part arrays against the reference's: missing, extra or different files (temporaries aside)."""
    mine = {str(p.relative_to(store)) for p in store.rglob("*.npy")
            if not any(TEMP_NAME.fullmatch(part) for part in p.relative_to(store).parts)}
    theirs = {str(p.relative_to(reference)) for p in reference.rglob("*.npy")}
    problems = [f"missing {name}" for name in sorted(theirs - mine)]
    problems += [f"extra {name}" for name in sorted(mine - theirs)]
    for name in sorted(mine & theirs):
        if not np.array_equal(np.load(store / name), np.load(reference / name)):
            problems.append(f"{name} differs")
    if not json.loads((store / "manifest.json").read_text()).get("complete"):
        problems.append("manifest not complete")
    return problems


def weights_differ(path: Path, reference: Path) -> bool:
    mine, theirs = (torch.load(p, map_location="cpu", weights_only=True) for p in (path, reference))
    return any(not torch.equal(mine[part][key], theirs[part][key])
               for part in ("state_dict", "loss_state_dict") for key in theirs[part])


def run_differences(run: Path, reference: Path, epochs: int) -> list[str]:
    """Every epoch_K.pt and epoch_latest.pt of ``run`` against the reference run's, bit for bit."""
    problems = []
    for name in [f"epoch_{k}.pt" for k in range(1, epochs + 1)] + ["epoch_latest.pt"]:
        path = run / "checkpoints" / name
        if not path.exists():
            problems.append(f"missing {name}")
        elif weights_differ(path, reference / "checkpoints" / name):
            problems.append(f"{name}: weights differ")
    return problems


def references(setup: Setup, processes) -> dict:
    """The uninterrupted store and run; the seconds of their work."""
    log, folder = setup.folder / "commands.log", setup.folder
    store = folder / "store-reference"
    return {"precompute": uninterrupted(processes, "engine.precompute", setup.precompute_argv(store),
                                        store / "parts", log),
            "train": uninterrupted(processes, "engine.train", setup.train_argv("reference"),
                                   folder / "logs" / "reference", log)}


def resumed(processes, module: str, argv: list[str], log: Path) -> list[str]:
    """Resume a killed command, to its end; a failure is a failed trial, recorded in one line."""
    process = processes.Process(target=child, args=(module, argv, str(log)))
    process.start()
    process.join()
    if process.exitcode == 0:
        return []
    return [f"resume failed (exit status {process.exitcode}): {' | '.join(log.read_text().splitlines()[-3:])}"]


def trial(index: int, setup: Setup, work: dict, rng: random.Random, processes) -> list[dict]:
    """Kill, resume and compare engine.precompute, then engine.train."""
    folder, log, rows = setup.folder, setup.folder / "commands.log", []
    store = folder / f"store-{index}"
    killed = kill_at_random(processes, "engine.precompute", setup.precompute_argv(store), store / "parts",
                            work["precompute"], rng, log)
    problems = resumed(processes, "engine.precompute", setup.precompute_argv(store), log)
    problems = problems or store_differences(store, folder / "store-reference")
    rows.append({"trial": index, "command": "engine.precompute", **killed,
                 "problems": problems + [f"left {name}" for name in temporaries(store)]})
    name = f"trial-{index}"
    run = folder / "logs" / name
    killed = kill_at_random(processes, "engine.train", setup.train_argv(name), run, work["train"], rng, log)
    # killed before its first checkpoint, the run starts over (--resume latest refuses a run without one)
    again = ["--resume", "latest"] if (run / "checkpoints" / "epoch_latest.pt").exists() else []
    problems = resumed(processes, "engine.train", setup.train_argv(name) + again, log)
    problems = problems or run_differences(run, folder / "logs" / "reference", setup.args.epochs)
    rows.append({"trial": index, "command": "engine.train", **killed,
                 "problems": problems + [f"left {name}" for name in temporaries(run)]})
    return rows


def forkserver():
    """Processes forked from a server that imported the commands once (no import time per process)."""
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(["engine.precompute", "engine.train"])
    return processes


def print_table(rows: list[dict], work: dict) -> None:
    print(f"uninterrupted work: engine.precompute {work['precompute']:.1f} s, engine.train {work['train']:.1f} s")
    print(f"{'trial':>5}  {'command':<17}  {'killed after':>12}  {'killed':<6}  result")
    for row in rows:
        result = "; ".join(row["problems"]) or "identical, complete, no temporaries"
        print(f"{row['trial']:>5}  {row['command']:<17}  {row['kill_after_s']:>10.3f} s  "
              f"{'yes' if row['killed'] else 'no':<6}  {result}")


def faults(argv=None) -> list[dict]:
    """The trials of ``argv``'s settings; one row per trial and command (``problems`` empty: it passed)."""
    args = parser().parse_args(argv)
    for name in ("trials", "samples", "shard_size", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.out:
        if args.out == str(DEFAULT_OUT):
            DEFAULT_OUT.parent.mkdir(parents=True, exist_ok=True)
        check_writable_file(Path(args.out), "--out")
    folder = Path(tempfile.mkdtemp(prefix="clip-rd-faults-"))
    try:
        setup = Setup(folder, args)
        processes = forkserver()
        work = references(setup, processes)
        rng = random.Random(args.seed)
        rows = [row for index in range(args.trials) for row in trial(index, setup, work, rng, processes)]
    finally:
        if args.keep:
            print(f"kept {folder} (commands.log: every command's output)")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(rows, work)
    if args.out:
        atomic_write_json(args.out, {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
                                     "uninterrupted_s": work, "rows": rows}, "--out")
    return rows


def check_all(argv=None) -> None:
    if any(row["problems"] for row in faults(argv)):
        raise SystemExit(1)


def main(argv=None) -> None:
    run_command(check_all, argv)


if __name__ == "__main__":
    main()
