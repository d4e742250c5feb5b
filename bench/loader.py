"""``python -m bench.loader``: the training data loader's samples/s next to the training step's.

Everything is the engine's own code: a configuration is an ``engine.train`` command line (``engine.train.parse_args``),
its inputs are resolved as ``engine.train`` resolves them (``prepare``, which builds the embedded data and the cache's
teacher stores when missing, or ``resolve_datacompdr``), the student, teacher source, loss, optimizer and data
stream come from ``build_state``, the loader from ``make_loader`` and the step is ``train_step``. Per configuration:

- ``loader``: the loader alone (``--workers`` worker processes, nothing training), samples/s over
  ``--loader-batches`` batches, from the one after each worker's first (their first batches arrive together) to the
  last;
- ``step``: ``train_step`` alone on batches the loader made beforehand (held in memory, the workers stopped), after
  ``--warmup-steps``: samples/s of the step with its teacher-row lookup, forward, loss, backward and optimizer;
- ``loop`` (section ``default`` only): the loader feeding the step as the training loop does, over ``--loop-steps``
  steps after the warm-up: what a run sees when the workers and the step share the machine.

Sections (``--sections``):

- ``default``: the default run's data and models (the embedded 32-pixel dataset, tiny teacher and student, ``--fused``,
  batch 256), its plain store against a reinforced store of ``--views`` K views and ``--captions`` C captions (built
  in the cache by ``engine.train``'s own preparation, as ``--augmentations K --captions C`` builds it). The cost of
  replaying a view, as a share of the step: the loader's extra time per sample with the reinforced store over the
  step's time per sample (target: at most 10 %), and the same from the ``loop`` rates.
- ``datacompdr``: DataCompDR shards at 224 pixels, written with ``engine.precompute --output-format datacompdr``
  (``--dr-views`` K views, ``--dr-captions`` C captions, a randomly initialised ``--dr-teacher``) from 224-pixel JPEG
  shards in img2dataset's layout (``bench.peer.write_shards``); read with ``--dataset-reinforcement`` (decode, npz,
  replay of the drawn view, the 224-pixel student transform, MobileCLIP's two captions per sample) by a randomly
  initialised ``--dr-student`` at ``--dr-batch-size``. Target: the loader's samples/s at least the step's.

The 1-minute load average is read before and after every measurement (before it, after waiting up to
``--wait-quiet-s`` for it to fall below ``--max-load``); one at or above ``--max-load`` marks the measurement as taken
under load. Results in ``--out`` (default ``bench/results/loader/``): ``loader.json``,
``loader.md`` and, with matplotlib, ``loader.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.cli import HelpFormatter

from .machine import describe
from .peer import cpu_s, wait_for_quiet

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "loader"
SECTIONS = ("default", "datacompdr")
REPLAY_TARGET = 0.10  # view replay: at most this share of a training step in the default run
KEEPS_UP_TARGET = 1.0  # DataCompDR shards: the loader at least as fast as the step


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def measured(what: str, fn, args: argparse.Namespace) -> dict:
    """``fn()``'s result dict, run once the 1-minute load average is below ``--max-load`` (waiting at most
    ``--wait-quiet-s``), with the load before and after it and whether either reached ``--max-load`` (the figure is
    then not a quiet machine's)."""
    start = time.perf_counter()
    before = wait_for_quiet(args.max_load, args.wait_quiet_s)
    waited = time.perf_counter() - start
    result = fn()
    after = load_1m()
    result.update(load_1m_before=before, load_1m_after=after, under_load=max(before, after) >= args.max_load,
                  waited_for_quiet_s=round(waited, 1))
    label = " (UNDER LOAD)" if result["under_load"] else ""
    print(f"  {what}: {result['samples_per_s']:.1f} samples/s, load {before} -> {after}{label}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- one configuration


class Configuration:
    """One ``engine.train`` command line, prepared as ``engine.train`` prepares it, with its measurements."""

    def __init__(self, name: str, argv: list[str]):
        from engine.train import parse_args
        from engine.training.datacompdr import resolve_datacompdr
        from engine.training.distributed import DistEnv
        from engine.training.prepare import prepare

        self.name, self.argv = name, argv
        self.cfg = parse_args(argv)
        start = time.perf_counter()
        self.sources = resolve_datacompdr(self.cfg) if self.cfg.dataset_reinforcement else \
            prepare(self.cfg, DistEnv())
        self.prepare_s = time.perf_counter() - start  # data and store built here when the cache lacks them

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size * self.cfg.accum_freq

    def build(self):
        """(TrainState, ShardStream) as engine.training.loop.run builds them, seeded as it seeds them."""
        from engine.training.distributed import DistEnv
        from engine.training.state import build_state

        cfg = self.cfg
        torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
        return build_state(cfg, self.sources, DistEnv(), torch.device("cpu"))

    def loader_and_step(self, loader_batches: int, warmup_steps: int, steps: int) -> tuple[dict, dict]:
        """The loader alone over ``loader_batches`` batches (the last ``warmup_steps + steps`` kept), then
        ``train_step`` alone on the kept batches, the workers stopped."""
        from engine.data.shards import make_loader
        from engine.training.step import train_step

        state, stream = self.build()
        available = stream.steps_per_epoch(0)
        if loader_batches > available:
            raise SystemExit(f"error: {self.name}: --loader-batches {loader_batches} is more than the "
                             f"{available} batches of an epoch")
        kept_count = warmup_steps + steps
        # the rate from the batch after each worker's first to the last: the workers start together, so their first
        # batches arrive in a burst (and the first one after the workers' start and the shuffle buffer's filling)
        first = min(self.cfg.workers, loader_batches - 2)
        stream.set_epoch(0, 0)
        batches = iter(make_loader(stream))
        pids = [worker.pid for worker in getattr(batches, "_workers", [])]  # the DataLoader's worker processes
        start, stamps, kept, worker_cpu = time.perf_counter(), [], [], []
        for batch in batches:
            stamps.append(time.perf_counter())
            if len(stamps) in (first + 1, loader_batches):  # the workers' CPU seconds at both ends of the timing
                worker_cpu.append(sum(cpu_s(pid) for pid in pids))
            kept = (kept + [batch])[-kept_count:]
            if len(stamps) == loader_batches:
                break
        del batches  # stops the worker processes before the step is timed
        timed = (len(stamps) - 1 - first) * self.batch_size
        loader = {"batches": len(stamps), "batch_size": self.batch_size, "first_batch_s": stamps[0] - start,
                  "timed_batches": len(stamps) - 1 - first, "samples_per_s": timed / (stamps[-1] - stamps[first]),
                  # CPU seconds the workers spent per sample: hardly changed by other processes sharing the cores
                  "cpu_s_per_sample": (worker_cpu[-1] - worker_cpu[0]) / timed if pids else None}
        step_s, step_cpu_s = [], []
        for batch in kept:
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(state, batch)
            step_s.append(time.perf_counter() - t0)
            step_cpu_s.append(time.process_time() - c0)  # every thread of this process
        measured_s, measured_cpu = step_s[warmup_steps:], step_cpu_s[warmup_steps:]
        step = {"warmup_steps": warmup_steps, "steps": len(measured_s), "batch_size": self.batch_size,
                "step_s": step_s, "step_cpu_s": step_cpu_s, "torch_threads": torch.get_num_threads(),
                "samples_per_s": len(measured_s) * self.batch_size / sum(measured_s),
                "cpu_s_per_sample": sum(measured_cpu) / (len(measured_cpu) * self.batch_size)}
        return loader, step

    def loop(self, warmup_steps: int, steps: int) -> dict:
        """The loader feeding ``train_step``, as engine.training.loop.train_one_epoch does (without its logging):
        samples/s over ``steps`` steps after ``warmup_steps``."""
        from engine.data.shards import make_loader
        from engine.training.step import train_step

        state, stream = self.build()
        total = warmup_steps + steps
        if total > stream.steps_per_epoch(0):
            raise SystemExit(f"error: {self.name}: --warmup-steps + --loop-steps {total} is more than the "
                             f"{stream.steps_per_epoch(0)} batches of an epoch")
        stream.set_epoch(0, 0)
        ends = []
        for batch in make_loader(stream):
            train_step(state, batch)
            ends.append(time.perf_counter())
            if len(ends) == total:
                break
        # from the end of the last warm-up step: each measured step includes its wait for the batch
        window = ends[-1] - ends[warmup_steps - 1] if warmup_steps else ends[-1] - ends[0]
        counted = steps if warmup_steps else steps - 1
        return {"warmup_steps": warmup_steps, "steps": counted, "batch_size": self.batch_size,
                "samples_per_s": counted * self.batch_size / window}

    def record(self) -> dict:
        return {"name": self.name, "command": "python -m engine.train " + " ".join(self.argv),
                "prepare_s": self.prepare_s}


# --------------------------------------------------------------------------------------------------------- sections


def default_argv(args: argparse.Namespace, views: int, captions: int) -> list[str]:
    """The default run (``python -m engine.train --fused``) with ``--workers``, and with a reinforced store when
    ``views`` or ``captions`` ask for one."""
    argv = ["--fused", "--workers", str(args.workers), "--no-progress", "--no-eval"]
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    if views or captions > 1:
        argv += ["--augmentations", str(views), "--captions", str(captions)]
    return argv


def section_default(args: argparse.Namespace) -> dict:
    """The default run's data: plain store against a reinforced one; loader, step and loop for each."""
    out = {"runs": {}}
    for key, views, captions in (("plain", 0, 1), ("reinforced", args.views, args.captions)):
        label = "plain store" if key == "plain" else f"reinforced store, K={views} views, C={captions} captions"
        print(f"default run's data, {label}: preparing (data and store are built in the cache when missing)",
              flush=True)
        config = Configuration(f"bench-loader-{key}", default_argv(args, views, captions))
        run = config.record()
        run["loader"], run["step"] = loader_then_step(config, args, args.steps)
        if args.loop_steps:
            run["loop"] = measured("loader feeding the step", lambda: config.loop(args.warmup_steps, args.loop_steps),
                                   args)
        out["runs"][key] = run
    out["replay"] = replay_cost(out["runs"])
    return out


def loader_then_step(config: Configuration, args: argparse.Namespace, steps: int) -> tuple[dict, dict]:
    """The loader alone, then ``steps`` steps alone on batches held in memory, as one measurement: the step ran right
    after the loader, so it carries the loader's load readings."""
    holder = {}

    def loader_alone():
        holder["loader"], holder["step"] = config.loader_and_step(args.loader_batches, args.warmup_steps, steps)
        return holder["loader"]

    loader = measured("loader alone", loader_alone, args)
    step = {**holder["step"], **{k: loader[k] for k in ("load_1m_before", "load_1m_after", "under_load")}}
    print(f"  step alone: {step['samples_per_s']:.3g} samples/s", flush=True)
    return loader, step


def replay_cost(runs: dict) -> Optional[dict]:
    """The extra time per sample of the reinforced store's loader (and loop) over the plain one's, as a share of
    the plain step's time per sample."""
    plain, reinforced = runs.get("plain"), runs.get("reinforced")
    if not (plain and reinforced):
        return None
    step_per_sample = 1 / plain["step"]["samples_per_s"]
    extra = 1 / reinforced["loader"]["samples_per_s"] - 1 / plain["loader"]["samples_per_s"]
    cost = {"loader_extra_s_per_sample": extra, "step_s_per_sample": step_per_sample,
            "share_of_step": extra / step_per_sample}
    if plain["loader"]["cpu_s_per_sample"] is not None and reinforced["loader"]["cpu_s_per_sample"] is not None:
        cpu_extra = reinforced["loader"]["cpu_s_per_sample"] - plain["loader"]["cpu_s_per_sample"]
        cost.update(loader_extra_cpu_s_per_sample=cpu_extra, step_cpu_s_per_sample=plain["step"]["cpu_s_per_sample"],
                    cpu_share_of_step=cpu_extra / plain["step"]["cpu_s_per_sample"])
    if "loop" in plain and "loop" in reinforced:
        loop_extra = 1 / reinforced["loop"]["samples_per_s"] - 1 / plain["loop"]["samples_per_s"]
        cost.update(loop_extra_s_per_sample=loop_extra,
                    loop_share_of_step=loop_extra * plain["loop"]["samples_per_s"])
    return cost


def section_datacompdr(args: argparse.Namespace, work: Path) -> dict:
    """DataCompDR shards at 224 pixels, written by engine.precompute, read by a 224-pixel student."""
    import engine.precompute
    import models

    from .peer import save_random_weights, write_shards

    models.register_model_configs()
    start = time.perf_counter()
    samples = args.dr_shards * args.dr_per_shard
    images = write_shards(work / "images", "train", args.dr_shards, args.dr_per_shard, args.dr_image_size,
                          args.seed, synthetic_captions=True)
    teacher_file = work / f"{args.dr_teacher}.pt"
    save_random_weights(args.dr_teacher, teacher_file, args.seed, None)
    images_s = time.perf_counter() - start
    print(f"datacompdr: {samples} samples of {args.dr_image_size} pixels written ({images_s:.1f} s); "
          f"engine.precompute --output-format datacompdr (teacher {args.dr_teacher}, K={args.dr_views}, "
          f"C={args.dr_captions})", flush=True)
    precompute_argv = ["--train-data", images, "--teacher", args.dr_teacher, "--teacher-pretrained",
                       str(teacher_file), "--teacher-store", str(work / "store"), "--augmentations",
                       str(args.dr_views), "--captions", str(args.dr_captions), "--batch-size", "32",
                       "--output-format", "datacompdr", "--output", str(work / "datacompdr")]
    start = time.perf_counter()
    engine.precompute.precompute(precompute_argv)
    precompute_s = time.perf_counter() - start
    shards = str(work / "datacompdr" / f"train-{{00000..{args.dr_shards - 1:05d}}}.tar")
    # an epoch long enough for the loader's batches: each worker starts over its shards when they hold fewer
    epoch = max(samples, args.dr_batch_size * (args.loader_batches + args.warmup_steps + args.dr_steps + 2 *
                                               args.workers))
    argv = ["--dataset-reinforcement", "--train-data", shards, "--train-num-samples", str(epoch),
            "--model", args.dr_student, "--batch-size", str(args.dr_batch_size), "--workers", str(args.workers),
            "--fused", "--distill-logit-scale", "100", "--distill-loss-weights", "0.0", "1.0", "--no-progress",
            "--no-eval"]
    print(f"datacompdr shards: {args.dr_student} student, batch {args.dr_batch_size}", flush=True)
    config = Configuration("datacompdr", argv)
    run = config.record()
    run.update(shards_samples=samples, image_size=args.dr_image_size, views=args.dr_views,
               captions=args.dr_captions, teacher=args.dr_teacher,
               shard_bytes=sum(f.stat().st_size for f in (work / "datacompdr").glob("*.tar")),
               write_images_s=images_s, precompute_s=precompute_s,
               precompute_command="python -m engine.precompute " + " ".join(precompute_argv))
    run["loader"], run["step"] = loader_then_step(config, args, args.dr_steps)
    run["loader_over_step"] = run["loader"]["samples_per_s"] / run["step"]["samples_per_s"]
    return {"runs": {"datacompdr": run}}


# ---------------------------------------------------------------------------------------------- targets and report


def targets(results: dict) -> list[dict]:
    out = []
    replay = results["sections"].get("default", {}).get("replay")
    if replay:
        out.append({"name": f"view replay costs at most {REPLAY_TARGET:.0%} of a training step in the default run "
                            "(loader's extra wall time per sample over the step's)",
                    "value": replay["share_of_step"], "goal": REPLAY_TARGET,
                    "met": replay["share_of_step"] <= REPLAY_TARGET})
        if "cpu_share_of_step" in replay:
            out.append({"name": "the same in CPU time (loader's extra CPU seconds per sample over the step's)",
                        "value": replay["cpu_share_of_step"], "goal": REPLAY_TARGET,
                        "met": replay["cpu_share_of_step"] <= REPLAY_TARGET})
    dr = results["sections"].get("datacompdr", {}).get("runs", {}).get("datacompdr")
    if dr:
        out.append({"name": "reading DataCompDR shards keeps up with the student's step (loader / step samples/s)",
                    "value": dr["loader_over_step"], "goal": KEEPS_UP_TARGET,
                    "met": dr["loader_over_step"] >= KEEPS_UP_TARGET})
    return out


ROW_NAMES = {("default", "plain"): "default run's data, plain store",
             ("default", "reinforced"): "default run's data, reinforced store",
             ("datacompdr", "datacompdr"): "DataCompDR shards, 224 pixels"}


def rows(results: dict):
    for (section, key), name in ROW_NAMES.items():
        run = results["sections"].get(section, {}).get("runs", {}).get(key)
        if run:
            yield section, key, name, run


def fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def cpu_us(measurement: dict) -> str:
    value = measurement.get("cpu_s_per_sample")
    return "-" if value is None else f"{value * 1e6:,.0f} us"


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = ["# Data loader against the training step", "",
             f"Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['memory_gib']} GiB; torch "
             f"{machine['torch']}. Command: `{results['command']}`; {results['seconds']:.0f} s in all.", "",
             "| configuration | batch | loader alone, samples/s | step alone, samples/s | loader / step | "
             "loader feeding the step, samples/s | CPU per sample: loader's workers, step | load (1 min) before -> "
             "after |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for section, key, name, run in rows(results):
        loader, step, loop = run["loader"], run["step"], run.get("loop")
        load = f"{loader['load_1m_before']} -> {(loop or loader)['load_1m_after']}"
        if loader["under_load"] or (loop and loop["under_load"]):
            load += " (under load)"
        small = 2 if step["samples_per_s"] < 10 else 1
        lines.append(f"| {name} | {loader['batch_size']} | {fmt(loader['samples_per_s'])} | "
                     f"{fmt(step['samples_per_s'], small)} | {loader['samples_per_s'] / step['samples_per_s']:,.1f}x "
                     f"| {fmt(loop['samples_per_s']) if loop else '-'} | {cpu_us(loader)}, {cpu_us(step)} | {load} |")
    lines += ["", "Commands (each a configuration of `engine.train`, measured in this process):", ""]
    for section, key, name, run in rows(results):
        lines.append(f"- {name}: `{run['command']}`" + (f"; shards written by `{run['precompute_command']}` "
                                                          f"({run['precompute_s']:.0f} s)"
                                                          if "precompute_command" in run else
                                                          f" (data and store ready after {run['prepare_s']:.0f} s)"))
    replay = results["sections"].get("default", {}).get("replay")
    if replay:
        extra_us, step_us = replay["loader_extra_s_per_sample"] * 1e6, replay["step_s_per_sample"] * 1e6
        text = (f"View replay: the reinforced store's loader takes {extra_us:,.0f} us more per sample than the plain "
                f"one's, against a step of {step_us:,.0f} us per sample: {replay['share_of_step']:.1%} of the step")
        if "loop_share_of_step" in replay:
            text += (f"; fed by the loader, the step takes {replay['loop_share_of_step']:.1%} more time per sample "
                     f"with the reinforced store")
        if "cpu_share_of_step" in replay:
            threads = results["sections"]["default"]["runs"]["plain"]["step"]["torch_threads"]
            text += (f". In CPU time, which other processes sharing the cores hardly change: the loader's workers take "
                     f"{replay['loader_extra_cpu_s_per_sample'] * 1e6:,.0f} us more per sample with the reinforced "
                     f"store, against the step's {replay['step_cpu_s_per_sample'] * 1e6:,.0f} us of CPU per sample "
                     f"(its {threads} threads): {replay['cpu_share_of_step']:.1%}")
        lines += ["", text + "."]
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for t in results["targets"]:
        lines.append(f"| {t['name']} | {t['value']:.3g} (goal {t['goal']:g}) | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Optional[Path]:
    """Loader and step samples/s per configuration, side by side (log scale: the 224-pixel step is ~100x slower);
    None without matplotlib."""
    from engine.training.logger import pyplot

    plt = pyplot()
    if plt is None:
        return None
    found = list(rows(results))
    if not found:
        return None
    fig, ax = plt.subplots(figsize=(9, 1.2 + 1.1 * len(found)))
    positions = np.arange(len(found))
    for offset, (what, colour) in enumerate((("loader", "tab:blue"), ("step", "tab:orange"), ("loop", "tab:green"))):
        values = [run[what]["samples_per_s"] if what in run else np.nan for *_, run in found]  # nan: no bar
        ax.barh(positions + (offset - 1) * 0.27, values, height=0.27, color=colour,
                label={"loader": "loader alone", "step": "step alone", "loop": "loader feeding the step"}[what])
    ax.set_yticks(positions, [name for _, _, name, _ in found])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("samples/s (log scale)")
    ax.legend(fontsize=8)
    under = sum(run[what]["under_load"] for *_, run in found for what in ("loader", "loop") if what in run)
    ax.set_title("data loader against the training step" + (f" ({under} measurement(s) under load)" if under else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "loader.md").write_text(markdown(results))
    plot(results, out / "loader.png")


# ------------------------------------------------------------------------------------------------------ the command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--out", default=str(DEFAULT_OUT), help="results folder (loader.json, loader.md, loader.png)")
    a("--render", default=None, metavar="LOADER_JSON", help="measure nothing: write --out's Markdown and plot again "
      "from this loader.json (targets recomputed)")
    a("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    a("--workers", type=int, default=2, help="engine.train --workers: DataLoader worker processes")
    a("--loader-batches", type=int, default=24, help="batches the loader-alone measurement reads")
    a("--warmup-steps", type=int, default=2, help="steps before the measured ones")
    a("--steps", type=int, default=10, help="measured steps of the default run's step alone")
    a("--loop-steps", type=int, default=30, help="measured steps of the default run's loader feeding the step "
      "(0: not measured)")
    a("--views", type=int, default=4, help="the default run's reinforced store: engine.train --augmentations K")
    a("--captions", type=int, default=2, help="the default run's reinforced store: engine.train --captions C")
    a("--cache-dir", default=None, help="engine.train --cache-dir: where the embedded data and the stores are (or "
      "are built) (default: $CLIP_RD_CACHE, else ~/.cache/clip_rd)")
    a("--dr-shards", type=int, default=2, help="DataCompDR shards written")
    a("--dr-per-shard", type=int, default=32, help="samples per DataCompDR shard (an epoch of the loader starts "
      "over them as often as it needs)")
    a("--dr-image-size", type=int, default=224, help="pixels of the DataCompDR shards' JPEG images")
    a("--dr-views", type=int, default=4, help="views per DataCompDR sample (engine.precompute --augmentations K)")
    a("--dr-captions", type=int, default=2, help="captions per DataCompDR sample, the .txt and C-1 synthetic ones "
      "(engine.precompute --captions C)")
    a("--dr-teacher", default="ViT-T-16", help="the randomly initialised teacher whose embeddings the DataCompDR "
      "shards carry")
    a("--dr-student", default="ViT-T-16", help="the student trained from the DataCompDR shards")
    a("--dr-batch-size", type=int, default=8, help="engine.train --batch-size for the DataCompDR shards")
    a("--dr-steps", type=int, default=3, help="measured steps of the DataCompDR student's step alone")
    a("--seed", type=int, default=0, help="seed of the DataCompDR shards and weights (engine.train's is its own "
      "default)")
    a("--max-load", type=float, default=1.5, help="a 1-minute load average at or above this, before or after a "
      "measurement, marks it as measured under load")
    a("--wait-quiet-s", type=float, default=0, help="before each measurement, wait up to this long for the load "
      "to fall below --max-load")
    a("--work-dir", default=None, help="where the DataCompDR shards, weights and store go (default: a temporary "
      "folder, removed at the end unless --keep)")
    a("--keep", action="store_true", help="keep the work folder")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        results["targets"] = targets(results)
        write(results, Path(args.out))
        print(markdown(results))
        return
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"error: --sections: unknown section(s) {unknown}; expected {','.join(SECTIONS)}")
    for name in ("workers", "loader_batches", "steps", "dr_steps", "dr_batch_size", "dr_shards", "dr_per_shard"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.loader_batches < args.workers + 2:
        raise SystemExit(f"error: --loader-batches: at least --workers + 2 ({args.workers + 2}): the rate is taken "
                         f"from the batch after each worker's first to the last")
    started = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="clip-rd-loader-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["python -m bench.loader", *(sys.argv[1:] if argv is None else argv)]),
               "machine": describe(), "settings": vars(args), "sections": {}}
    try:
        if "default" in sections:
            results["sections"]["default"] = section_default(args)
        if "datacompdr" in sections:
            results["sections"]["datacompdr"] = section_datacompdr(args, work)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    results["targets"] = targets(results)
    out = Path(args.out)
    write(results, out)
    print(markdown(results))
    print(f"wrote {out / 'loader.json'}, loader.md" + (", loader.png" if (out / "loader.png").exists() else ""))


if __name__ == "__main__":
    main()
