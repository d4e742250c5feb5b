"""``python -m bench.peer``: this engine side by side with open_clip_train, at real model sizes.

Both tools train the same student (``ViT-T-16``) from the same initial weights on the same 224-pixel JPEG shards
(img2dataset's layout, written here by the procedural sample maker), with the same batch size, learning rate,
precision and ``--workers``; the distillation runs use the same ``ViT-B-16`` teacher (random weights, saved once to
a file that both load). Every measurement is a fresh process (``bench.peer_launch``), runs of the two tools
interleaved (A B A B) so that drift of a shared machine hits both. Sections (``--sections``):

- ``loss``: the same first batch (one shard of exactly one batch) and the same initial weights: open_clip_train's
  first logged loss (``--distill-model``: CLIP's loss plus the soft cross-entropy of the teacher's probabilities,
  open_clip's DistillClipLoss) against the engine's equivalent (``--preset baseline --hrd-weight 1``: task + hrd,
  with the online teacher, and from a store).
- ``loader``: each tool's training data loader alone (samples/s).
- ``plain``: plain CLIP, open_clip_train against ``engine.train --preset baseline --fused``.
- ``distill``: open_clip_train ``--distill-model`` against the engine reading the teacher store (built first by
  ``engine.precompute``, timed) and against the engine with ``--online-teacher``.
- ``search``: the largest global batch whose peak memory stays under ``--cap-gib``, for open_clip_train (plain) and
  for the engine (``--fused --accum-freq``), by doubling then bisection, each probe ``--probe-steps`` steps.

Per run: samples/s over the measured steps (the wall time between optimizer steps, recorded the same way in both
tools' processes, and each tool's own logged figure beside it), the step-time breakdown (data wait, student
forward, teacher, loss, backward, optimizer), and peak memory of the process tree (the main process and its
DataLoader workers: the sum of their RSS and of their PSS, sampled every 0.1 s, and the largest single process's
own peak RSS, its VmHWM). Results: ``--out`` (default ``bench/results/peer/``): ``peer.json``, ``peer.md``,
``peer.png``. ``--smoke`` runs tiny 32-pixel models for a few steps, to prove that everything runs.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from engine.cli import HelpFormatter

from .machine import describe

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "peer"
SECTIONS = ("loss", "loader", "plain", "distill", "search")
GiB = float(1 << 30)
LOSS_TOLERANCE = 1e-4
POLL_S = 0.1
# The smoke test's models: 32-pixel ViTs with open_clip's tokenizer (so that open_clip_train can train them too).
SMOKE_CONFIGS = {
    "peer-smoke-student": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                                           "head_width": 16, "patch_size": 8},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                        "layers": 1}},
    "peer-smoke-teacher": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64,
                                                           "head_width": 32, "patch_size": 8},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                        "layers": 2}},
}
PHASE_NAMES = ("wait", "student_forward", "teacher", "loss", "backward", "optimizer")


# ------------------------------------------------------------------------------------------- processes and memory


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                kids += [int(x) for x in handle.read().split()]
    except OSError:
        pass
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (DataLoader workers, their helpers)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += _children(pid)
    return pids


def _kib(path: str, field: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_memory(pids: list[int]) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, largest VmHWM) of ``pids`` in bytes: RSS counts pages shared between the processes
    (libraries, batches in shared memory) once per process, PSS splits them among their users; VmHWM is a process's
    own peak RSS, kept by the kernel."""
    return (sum(_kib(f"/proc/{pid}/status", "VmRSS:") for pid in pids),
            sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids),
            max((_kib(f"/proc/{pid}/status", "VmHWM:") for pid in pids), default=0))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLOCK_TICKS


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of one process so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def mem_available() -> int:
    return _kib("/proc/meminfo", "MemAvailable:")


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


class Launcher:
    """Runs ``bench.peer_launch`` processes, each in a folder of its own, watching their memory."""

    def __init__(self, work: Path, configs: Optional[Path], phases: bool, sync: bool, cap_bytes: Optional[int],
                 min_available: int, keep: bool, verbose: bool = True):
        self.work, self.configs, self.phases, self.sync = work, configs, phases, sync
        self.cap_bytes, self.min_available, self.keep, self.verbose = cap_bytes, min_available, keep, verbose
        self.count = 0
        self.history: list[tuple[float, float]] = []  # (wall seconds, other processes' CPU share) of every run

    def run(self, label: str, tool: str, argv: list[str], *, logs: Optional[Path] = None, cap: bool = False,
            timeout: Optional[float] = None, phases: Optional[bool] = None, sync: bool = False,
            loader_batches: int = 8) -> dict:
        """One process; its events, exit, wall time and memory peaks. ``cap``: killed once its memory passes the
        cap (the search's probes). A process is also killed when the machine's available memory drops below
        ``min_available`` (the machine is shared), or after ``timeout`` seconds."""
        self.count += 1
        folder = self.work / "runs" / f"{self.count:03d}-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        events = folder / "events.jsonl"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in
                                                                         [os.environ.get("PYTHONPATH")] if p]),
               "CLIP_RD_PEER_EVENTS": str(events),
               "CLIP_RD_PEER_PHASES": "1" if (self.phases if phases is None else phases) else "0",
               "CLIP_RD_PEER_SYNC": "1" if sync else "0", "CLIP_RD_PEER_LOADER_BATCHES": str(loader_batches),
               "CLIP_RD_PEER_CONFIGS": str(self.configs or "")}
        if cap and self.cap_bytes and self.device_cap:
            env["CLIP_RD_PEER_CUDA_CAP"] = str(self.cap_bytes)
        load = load_1m()
        command = [sys.executable, "-m", "bench.peer_launch", tool, *argv]
        (folder / "command.txt").write_text(" ".join(command) + "\n")
        start, busy_start, own_cpu, mine = time.perf_counter(), machine_busy_s(), {}, time.process_time()
        with open(folder / "output.txt", "w") as output:
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            peak_rss = peak_pss = peak_hwm = 0
            killed = None
            while True:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
                if pid:
                    break
                pids = process_tree(proc.pid)
                for child in pids:  # CPU time is monotonic: keep each process's last reading
                    own_cpu[child] = max(own_cpu.get(child, 0.0), cpu_s(child))
                rss, pss, hwm = tree_memory(pids)
                peak_rss, peak_pss, peak_hwm = max(peak_rss, rss), max(peak_pss, pss), max(peak_hwm, hwm)
                if killed is None:
                    if cap and self.cap_bytes and not self.device_cap and pss > self.cap_bytes:
                        killed = "cap"
                    elif mem_available() < self.min_available:
                        killed = "machine memory low"
                    elif timeout is not None and time.perf_counter() - start > timeout:
                        killed = "timeout"
                    if killed:
                        os.killpg(proc.pid, signal.SIGKILL)  # this run's own process group
                time.sleep(POLL_S)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        # what other processes took of the machine meanwhile (this run's own CPU time, sampled every 0.1 s, taken out)
        own = sum(own_cpu.values()) + time.process_time() - mine  # the run's processes and this one's polling
        others = max(machine_busy_s() - busy_start - own, 0.0) / (wall * (os.cpu_count() or 1))
        rows = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
        result = {"label": label, "tool": tool, "returncode": proc.returncode, "killed": killed, "wall_s": wall,
                  "load_1m_before": load, "others_cpu_share": others, "peak_tree_rss": peak_rss,
                  "peak_tree_pss": peak_pss, "max_process_rss": peak_hwm, "folder": str(folder),
                  "logs": str(logs or ""),
                  "steps": [r for r in rows if r["kind"] == "step"],
                  **{r["kind"]: r for r in rows if r["kind"] != "step"}}
        self.history.append((wall, others))
        exit_row = result.get("exit", {})
        if "cuda_peak_bytes" in exit_row:
            result["cuda_peak"] = exit_row["cuda_peak_bytes"]
        if proc.returncode != 0 and killed is None:
            result["error"] = tail(folder / "output.txt")
        if self.verbose:
            print(f"  {label}: exit {proc.returncode}{f' (killed: {killed})' if killed else ''}, {wall:.1f} s, "
                  f"{len(result['steps'])} steps, peak PSS {peak_pss / GiB:.2f} GiB, RSS {peak_rss / GiB:.2f} GiB, "
                  f"load {load}, other processes {others:.0%} of the CPUs", flush=True)
        return result

    device_cap = False  # True on CUDA: the cap is the GPU's memory (set per process), not the host's

    def clean(self, result: dict) -> None:
        """Remove a finished run's logs folder (its checkpoints are large)."""
        if not self.keep and result.get("logs"):
            shutil.rmtree(result["logs"], ignore_errors=True)


def tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:])


# ------------------------------------------------------------------------------------------------ data and weights


def write_shards(root: Path, split: str, shards: int, per_shard: int, size: int, seed: int,
                 synthetic_captions: bool = False) -> str:
    """img2dataset-layout shards of procedural samples: ``{key}.jpg`` (``size`` pixels, JPEG quality 90),
    ``{key}.txt`` and ``{key}.json``, with ``synthetic_captions`` also DataCompDR's ``{key}.syn.json`` (the embedded
    dataset's synthetic captions, from a generator of their own: the images are the same either way); a
    ``sizes.json``. Returns the brace pattern."""
    from engine.data import synthetic

    root.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard in range(shards):
        rng = np.random.default_rng([seed, shard])
        syn_rng = np.random.default_rng([seed, shard, 1])
        name = f"{split}-{shard:05d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for index in range(per_shard):
                image, meta = synthetic.make_sample(rng, size)
                key = f"{shard:05d}{index:04d}"
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                meta = {"key": key, "width": size, "height": size, **meta}
                members = [("jpg", buffer.getvalue()), ("txt", meta["caption"].encode()),
                           ("json", json.dumps(meta).encode())]
                if synthetic_captions:
                    captions = {"syn_text": synthetic.synthetic_captions(meta, syn_rng)}
                    members.append(("syn.json", json.dumps(captions).encode()))
                for ext, payload in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        sizes[name] = per_shard
    (root / "sizes.json").write_text(json.dumps(sizes))
    return str(root / f"{split}-{{00000..{shards - 1:05d}}}.tar")


def save_random_weights(name: str, path: Path, seed: int, configs: Optional[Path]) -> None:
    """A randomly initialised model's state dict, saved once: both tools load this file."""
    import open_clip
    import torch

    import models

    models.register_model_configs()
    if configs is not None:
        open_clip.add_model_config(configs)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    torch.save(model.state_dict(), path)


# ----------------------------------------------------------------------------------------------------- log parsing

_OC_STEP = re.compile(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.e+-]+)/s")
_OC_TERM = re.compile(r"(\w+): ([-\d.e+]+|nan|inf) \(")


def open_clip_log(folder: Path) -> list[dict]:
    """open_clip_train's per-step log lines (--log-every-n-steps 1) in a run's folder: data time, batch time,
    samples/s, loss terms."""
    rows = []
    for log in folder.glob("out.log"):
        for line in log.read_text(errors="replace").splitlines():
            match = _OC_STEP.search(line)
            if not match:
                continue
            terms = dict(_OC_TERM.findall(line.split("Logit Scale:", 1)[-1]))
            rows.append({"data_s": float(match.group(1)), "batch_s": float(match.group(2)),
                         "samples_per_s": float(match.group(3)), **{k.lower(): float(v) for k, v in terms.items()}})
    return rows


def engine_log(folder: Path) -> list[dict]:
    """The engine's 'train' rows of metrics.jsonl (--log-every-n-steps 1) in a run's folder."""
    rows = []
    for metrics in folder.glob("metrics.jsonl"):
        rows += [row for row in map(json.loads, metrics.read_text().splitlines()) if row.get("kind") == "train"]
    return rows


def summarise(result: dict, batch: int, warmup: int, measured: int) -> dict:
    """samples/s and the mean step breakdown over the measured steps (after ``warmup``), and the tool's own
    logged samples/s over the same steps."""
    steps = result["steps"]
    out = {k: result.get(k) for k in ("label", "tool", "returncode", "killed", "wall_s", "load_1m_before",
                                      "others_cpu_share",
                                      "peak_tree_rss", "peak_tree_pss", "max_process_rss", "cuda_peak", "error")}
    out["steps_done"] = len(steps)
    window = steps[warmup:warmup + measured]
    if warmup < 1 or len(window) < measured or measured < 1:
        out["samples_per_s"] = None
        return out
    elapsed = window[-1]["end"] - steps[warmup - 1]["end"]
    out["samples_per_s"] = batch * len(window) / elapsed
    out["step_s"] = elapsed / len(window)
    if "student_forward" in window[0]:
        phases = {name: sum(row[name] for row in window) / len(window) for name in PHASE_NAMES}
        phases["other"] = out["step_s"] - sum(phases.values())
        out["breakdown"] = phases
    folder = Path(result["logs"])
    logged = open_clip_log(folder) if result["tool"] == "open_clip" else engine_log(folder)
    if len(logged) >= warmup + measured:
        rows = logged[warmup:warmup + measured]
        seconds = [r["batch_s"] if "batch_s" in r else r["step_s"] + r["data_s"] for r in rows]
        out["logged_samples_per_s"] = batch * len(rows) / sum(seconds) if sum(seconds) > 0 else None
        out["logged_data_s"] = sum(r["data_s"] for r in rows) / len(rows)
    return out


# --------------------------------------------------------------------------------------------------------- the run


class Peer:
    """One benchmark: settings, the shared inputs (data, weights, store) and the sections' results."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.cuda = args, torch.cuda.is_available()
        self.started = time.perf_counter()
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="clip-rd-peer-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.configs = None
        if args.smoke:
            self.configs = self.work / "configs"
            self.configs.mkdir(exist_ok=True)
            for name, cfg in SMOKE_CONFIGS.items():
                (self.configs / f"{name}.json").write_text(json.dumps(cfg))
        cap = int(args.cap_gib * GiB)
        self.launcher = Launcher(self.work, self.configs, phases=not self.cuda, sync=False, cap_bytes=cap,
                                 min_available=int(args.min_available_gib * GiB), keep=args.keep)
        self.launcher.device_cap = self.cuda
        self.results: dict = {"sections": {}}

    # ------------------------------------------------------------------ inputs

    def prepare(self) -> None:
        a = self.args
        start = time.perf_counter()
        steps = a.warmup_steps + a.steps
        per_shard = max(1, -(-steps * a.batch_size // a.shards))
        self.train = write_shards(self.work / "data", "train", a.shards, per_shard, a.image_size, a.seed)
        self.train_samples = per_shard * a.shards
        self.loss_data = write_shards(self.work / "loss-data", "train", 1, a.loss_batch, a.image_size, a.seed + 1)
        weights = self.work / "weights"
        weights.mkdir(exist_ok=True)
        self.student_file, self.teacher_file = weights / f"{a.student}.pt", weights / f"{a.teacher}.pt"
        save_random_weights(a.student, self.student_file, a.seed, self.configs)
        if {"loss", "distill"} & set(self.sections):
            save_random_weights(a.teacher, self.teacher_file, a.seed + 1, self.configs)
        self.results["inputs"] = {"train": self.train, "train_samples": self.train_samples,
                                  "loss_data": self.loss_data, "image_size": a.image_size,
                                  "student": a.student, "teacher": a.teacher, "seconds": time.perf_counter() - start}

    # ------------------------------------------------------------------ command lines

    def shared(self, name: str, batch: int, steps: int, train: Optional[str] = None, workers: Optional[int] = None,
               samples: Optional[int] = None) -> list[str]:
        """The flags both tools take, with open_clip_train's meanings."""
        a = self.args
        logs = self.work / "logs"
        return ["--train-data", train or self.train, "--train-num-samples", str(samples or steps * batch),
                "--batch-size", str(batch), "--epochs", "1", "--lr", str(a.lr), "--wd", "0.1", "--warmup", "10",
                "--precision", a.precision, "--workers", str(a.workers if workers is None else workers),
                "--seed", str(a.seed), "--log-every-n-steps", "1", "--save-frequency", "0", "--logs", str(logs),
                "--name", name, "--model", a.student, "--pretrained", str(self.student_file),
                "--dataset-type", "webdataset"]

    def open_clip(self, name: str, batch: int, steps: int, distill: bool = False, **kw) -> list[str]:
        extra = ["--distill-model", self.args.teacher, "--distill-pretrained", str(self.teacher_file)] if distill \
            else []
        # scale (1, 1): open_clip_train's random crop keeps the whole image, so both tools see the same pixels
        return self.shared(name, batch, steps, **kw) + ["--aug-cfg", "scale=(1.0,1.0)"] + extra

    def engine(self, name: str, batch: int, steps: int, teacher: Optional[str] = None, store: Optional[str] = None,
               accum: int = 1, **kw) -> list[str]:
        """``teacher``: None (plain CLIP), 'store' or 'online' (open_clip's distillation objective: task + hrd)."""
        argv = self.shared(name, batch, steps, **kw) + ["--fused", "--no-progress", "--no-eval",
                                                       "--stop-after-steps", str(steps), "--preset", "baseline"]
        if accum > 1:
            argv += ["--accum-freq", str(accum)]
        if teacher is not None:
            argv += ["--hrd-weight", "1", "--distill-model", self.args.teacher, "--distill-pretrained",
                     str(self.teacher_file)]
            argv += ["--online-teacher"] if teacher == "online" else ["--teacher-store", store]
        return argv

    @property
    def sections(self) -> list[str]:
        return [s.strip() for s in self.args.sections.split(",") if s.strip()]

    def run_tool(self, label: str, tool: str, argv: list[str], **kw) -> dict:
        """A launcher run whose --name is ``label`` (its logs: <work>/logs/<label>)."""
        return self.launcher.run(label, tool, argv, logs=self.work / "logs" / label, **kw)

    def measured(self, label: str, tool: str, argv: list[str], batch: int) -> dict:
        a = self.args
        result = self.run_tool(label, tool, argv)
        summary = summarise(result, batch, a.warmup_steps, a.steps)
        self.launcher.clean(result)
        return summary

    # ------------------------------------------------------------------ sections

    def section_loss(self) -> dict:
        """The same first batch and initial weights: open_clip_train's first loss against the engine's."""
        b = self.args.loss_batch
        common = dict(train=self.loss_data, workers=0, samples=b)
        oc = self.run_tool("loss-open_clip", "open_clip",
                           self.open_clip("loss-open_clip", b, 1, distill=True, **common))
        online = self.run_tool("loss-engine-online", "engine",
                               self.engine("loss-engine-online", b, 1, teacher="online", **common))
        runs = [oc, online]
        if self.args.loss_store:
            store_dir = self.work / "loss-store"
            runs.append(self.run_tool("loss-precompute", "precompute",
                                      self.precompute_argv(self.loss_data, store_dir)))
            runs.append(self.run_tool("loss-engine-store", "engine",
                                      self.engine("loss-engine-store", b, 1, teacher="store", store=str(store_dir),
                                                  **common)))
        first = oc.get("first_loss")
        logged = open_clip_log(Path(oc["logs"]))
        out = {"batch": b, "open_clip": first, "open_clip_logged": logged[0] if logged else None,
               "errors": {r["label"]: r.get("error") for r in runs if r.get("error")}}
        for key, run in zip(("engine_online", "engine_store"), runs[1::2]):
            rows = engine_log(Path(run["logs"]))
            out[key] = {k: rows[0][k] for k in ("task", "hrd", "total")} if rows else None
        for run in runs:
            self.launcher.clean(run)
        if first is None or out["engine_online"] is None:
            out["passed"] = False
            return out
        entropy = first["teacher_entropy"]
        for key in ("engine_online", "engine_store"):
            engine = out.get(key)
            if engine is None:
                continue
            engine["task_diff"] = engine["task"] - first["contrastive_loss"]
            engine["hrd_plus_entropy_diff"] = engine["hrd"] + entropy - first["distill_loss"]
            engine["total_diff_raw"] = engine["total"] - first["loss"]
            engine["total_plus_entropy_diff"] = engine["total"] + entropy - first["loss"]
        engine = out["engine_online"]
        out["passed"] = abs(engine["task_diff"]) <= LOSS_TOLERANCE and \
            abs(engine["total_plus_entropy_diff"]) <= LOSS_TOLERANCE
        if out["open_clip_logged"] is not None:  # the recorded value is the one open_clip_train logs (5 digits)
            shown = out["open_clip_logged"].get("loss")
            half_digit = 0.5 * 10 ** (math.floor(math.log10(abs(first["loss"]))) - 4) if first["loss"] else 0
            out["logged_matches_recorded"] = shown is not None and abs(shown - first["loss"]) <= half_digit * 1.01
        print(f"  step-0 loss: open_clip {first['loss']:.6f} (contrastive {first['contrastive_loss']:.6f}, distill "
              f"{first['distill_loss']:.6f}, teacher entropy {entropy:.6f}); engine task {engine['task']:.6f}, hrd "
              f"{engine['hrd']:.6f}: task diff {engine['task_diff']:.2e}, total + entropy diff "
              f"{engine['total_plus_entropy_diff']:.2e} -> {'passed' if out['passed'] else 'FAILED'}", flush=True)
        return out

    def precompute_argv(self, train: str, store: Path) -> list[str]:
        return ["--train-data", train, "--teacher", self.args.teacher, "--teacher-pretrained", str(self.teacher_file),
                "--teacher-store", str(store), "--batch-size", str(self.args.precompute_batch)]

    def section_loader(self) -> dict:
        a = self.args
        batches = a.loader_batches
        out = {}
        for tool, argv in (("open_clip-loader", self.open_clip("open_clip-loader", a.batch_size, batches)),
                           ("engine-loader", self.engine("engine-loader", a.batch_size, batches))):
            run = self.run_tool(tool, tool, argv, loader_batches=batches)
            out[tool.split("-")[0]] = {**(run.get("loader") or {}), "error": run.get("error")}
        return out

    def section_plain(self) -> dict:
        a, b, steps = self.args, self.args.batch_size, self.args.warmup_steps + self.args.steps
        runs = {"open_clip": [], "engine": []}
        for repeat in range(a.repeats):
            runs["open_clip"].append(self.measured(f"plain-open_clip-{repeat}", "open_clip",
                                                   self.open_clip(f"plain-open_clip-{repeat}", b, steps), b))
            runs["engine"].append(self.measured(f"plain-engine-{repeat}", "engine",
                                                self.engine(f"plain-engine-{repeat}", b, steps), b))
        out = {"runs": runs}
        if self.cuda:  # the breakdown needs synchronisation, which slows a GPU step: runs of their own
            out["breakdown_runs"] = {
                "open_clip": self.breakdown_run("open_clip", self.open_clip("breakdown-open_clip", b, steps)),
                "engine": self.breakdown_run("engine", self.engine("breakdown-engine", b, steps))}
        return out

    def breakdown_run(self, tool: str, argv: list[str]) -> dict:
        a = self.args
        result = self.run_tool(f"breakdown-{tool}", tool, argv, phases=True, sync=True)
        self.launcher.clean(result)
        return summarise(result, a.batch_size, a.warmup_steps, a.steps)

    def section_distill(self) -> dict:
        a, b, steps = self.args, self.args.batch_size, self.args.warmup_steps + self.args.steps
        store = self.work / "store"
        pre = self.run_tool("precompute", "precompute", self.precompute_argv(self.train, store))
        out = {"precompute": {"wall_s": pre["wall_s"], "samples": self.train_samples, "returncode": pre["returncode"],
                              "error": pre.get("error"), "peak_tree_pss": pre["peak_tree_pss"],
                              "reported": tail(Path(pre["folder"]) / "output.txt", 1)}}
        runs = {"open_clip": [], "engine_store": [], "engine_online": []}
        for repeat in range(a.repeats):
            runs["open_clip"].append(self.measured(
                f"distill-open_clip-{repeat}", "open_clip",
                self.open_clip(f"distill-open_clip-{repeat}", b, steps, distill=True), b))
            runs["engine_store"].append(self.measured(
                f"distill-engine-store-{repeat}", "engine",
                self.engine(f"distill-engine-store-{repeat}", b, steps, teacher="store", store=str(store)), b))
            runs["engine_online"].append(self.measured(
                f"distill-engine-online-{repeat}", "engine",
                self.engine(f"distill-engine-online-{repeat}", b, steps, teacher="online"), b))
        out["runs"] = runs
        return out

    def probe(self, tool: str, batch: int, micro: Optional[int], estimate: Optional[float]) -> dict:
        a = self.args
        name = f"probe-{tool}-{batch}"
        steps = a.probe_steps
        if tool == "open_clip":
            # resampled shards: a probe's batch may be larger than a worker's shards hold
            argv = self.open_clip(name, batch, steps) + ["--dataset-resampled"]
        else:
            argv = self.engine(name, micro, steps, accum=batch // micro, samples=steps * batch)
        timeout = max(120.0, 3 * estimate) if estimate else None
        result = self.run_tool(name, tool, argv, cap=True, timeout=timeout, phases=False)
        self.launcher.clean(result)
        peak = result.get("cuda_peak") if self.cuda else result["peak_tree_pss"]
        done = len(result["steps"]) >= steps
        fits = result["returncode"] == 0 and done and peak is not None and peak <= self.launcher.cap_bytes
        reason = result["killed"] or ("" if fits else ("out of memory" if "out of memory" in
                                                       (result.get("error") or "").lower() else
                                                       result.get("error") or "fewer steps than asked"))
        return {"batch": batch, "fits": fits, "reason": reason, "wall_s": result["wall_s"], "peak": peak,
                "peak_tree_rss": result["peak_tree_rss"], "max_process_rss": result["max_process_rss"],
                "steps_done": len(result["steps"]), "load_1m_before": result["load_1m_before"]}

    def search(self, tool: str, start: int, granularity: int, per_sample_s: Optional[float],
               startup_s: Optional[float], deadline: float) -> dict:
        """Doubling from ``start`` until a probe does not fit, then ``--bisections`` bisection steps (multiples of
        ``granularity``); a probe whose estimated time would pass ``deadline`` is not run (the result is then a
        lower bound)."""
        a = self.args
        micro = granularity if tool == "engine" else None
        probes, lo, hi, stopped = [], None, None, None

        def estimate(batch: int) -> Optional[float]:
            if per_sample_s is None:
                return None
            factor = a.accum_time_factor if tool == "engine" else 1.0
            return (startup_s or 0.0) + a.probe_steps * batch * per_sample_s * factor

        def affordable(batch: int) -> bool:
            guess = estimate(batch)
            return guess is None or time.perf_counter() + guess <= deadline

        batch = start
        while batch <= a.max_batch:
            if not affordable(batch):
                stopped = f"time: a probe at {batch} would take about {estimate(batch):.0f} s"
                break
            probes.append(self.probe(tool, batch, micro, estimate(batch)))
            if probes[-1]["fits"]:
                lo, batch = batch, batch * 2
            else:
                hi = batch
                break
        else:
            stopped = f"--max-batch {a.max_batch}"
        for _ in range(a.bisections if hi is not None else 0):
            low = lo or 0
            mid = (low + hi) // 2 // granularity * granularity
            if mid <= low or mid >= hi or mid < granularity:
                break
            if not affordable(mid):
                stopped = f"time: a probe at {mid} would take about {estimate(mid):.0f} s"
                break
            probes.append(self.probe(tool, mid, micro, estimate(mid)))
            lo, hi = (mid, hi) if probes[-1]["fits"] else (lo, mid)
        return {"largest_fitting": lo, "smallest_failing": hi, "stopped": stopped, "probes": probes,
                "granularity": granularity, "micro_batch": micro}

    def section_search(self) -> dict:
        a = self.args
        deadline = self.started + a.time_budget_s
        plain = self.results["sections"].get("plain", {}).get("runs", {})
        rates = {tool: [r for r in runs if r.get("samples_per_s")] for tool, runs in plain.items()}
        out = {"cap_bytes": self.launcher.cap_bytes, "cap_kind": "GPU memory (torch's peak reserved)" if self.cuda
               else "peak PSS of the process tree (main process and DataLoader workers)"}

        def timing(tool):
            runs = rates.get(tool) or []
            if not runs:
                return None, None
            per_sample = 1 / (sum(r["samples_per_s"] for r in runs) / len(runs))
            steps = a.warmup_steps + a.steps
            startup = min(r["wall_s"] - steps * a.batch_size * per_sample for r in runs)
            return per_sample, max(startup, 0.0)

        remaining = max(deadline - time.perf_counter(), 0)
        # open_clip's search may use at most half of what is left, so that the engine's gets a share
        out["open_clip"] = self.search("open_clip", a.batch_size, a.granularity, *timing("open_clip"),
                                       time.perf_counter() + remaining / 2)
        oc_max = out["open_clip"]["largest_fitting"] or a.batch_size
        micro = a.batch_size
        # the engine's memory hardly grows with --accum-freq: start where the question is, at --engine-start times
        # open_clip_train's largest (whole micro-batches), then double (or bisect below it if that does not fit)
        start = max(micro, -(-int(a.engine_start * oc_max) // micro) * micro)
        out["engine"] = self.search("engine", start, micro, *timing("engine"), deadline)
        return out

    # ------------------------------------------------------------------ the whole run

    def run(self) -> dict:
        a = self.args
        self.results["machine"] = describe()
        self.results["settings"] = {k: v for k, v in vars(a).items() if k not in ("out",)}
        self.results["settings"]["device"] = "cuda" if self.cuda else "cpu"
        self.results["load_1m_before"] = wait_for_quiet(a.max_load, a.wait_quiet_s)
        self.started = time.perf_counter()  # the time budget starts after the wait
        print(f"peer benchmark: sections {self.sections}, load {self.results['load_1m_before']}, work folder "
              f"{self.work}", flush=True)
        self.prepare()
        for section in SECTIONS:
            if section not in self.sections:
                continue
            print(f"[{section}]", flush=True)
            start = time.perf_counter()
            self.results["sections"][section] = getattr(self, f"section_{section}")()
            self.results["sections"][section]["seconds"] = time.perf_counter() - start
        self.results["load_1m_at_end"] = load_1m()
        # the 1-minute average counts this run's own work: read it again once that has decayed (e^-1 after 60 s)
        time.sleep(a.after_pause_s)
        self.results["load_1m_after"] = load_1m()
        self.results["others_cpu_share"] = others_share(self.launcher.history)
        self.results["seconds"] = time.perf_counter() - self.started
        self.results["under_load"] = max(self.results["load_1m_before"], self.results["load_1m_after"]) >= a.max_load
        self.results["targets"] = targets(self.results)
        return self.results


def others_share(history: list[tuple[float, float]]) -> dict:
    """Over all runs: the share of the machine's CPUs that other processes took, mean (by time) and largest."""
    total = sum(wall for wall, _ in history)
    return {"mean": sum(wall * share for wall, share in history) / total if total else None,
            "max": max((share for _, share in history), default=None)}


def wait_for_quiet(max_load: float, wait_s: float) -> float:
    """The 1-minute load average, after waiting up to ``wait_s`` seconds for it to fall below ``max_load``."""
    deadline = time.time() + wait_s
    while load_1m() >= max_load and time.time() < deadline:
        time.sleep(min(30.0, max(deadline - time.time(), 0.1)))
    return load_1m()


# ---------------------------------------------------------------------------------------------- targets and report


def mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def rate(section: dict, key: str) -> Optional[float]:
    return mean(r.get("samples_per_s") for r in section.get("runs", {}).get(key, []))


def target(name: str, value: Optional[float], goal: float, unit: str = "x") -> dict:
    if value is None:
        return {"target": name, "value": None, "goal": goal, "met": None, "note": "not measured"}
    met = value >= goal
    note = "met" if met else f"missed by {goal - value:.3g}{unit} ({value / goal:.0%} of the goal)"
    return {"target": name, "value": value, "goal": goal, "met": met, "note": note}


def targets(results: dict) -> list[dict]:
    s = results["sections"]
    plain, distill = s.get("plain", {}), s.get("distill", {})
    oc_plain, engine_plain = rate(plain, "open_clip"), rate(plain, "engine")
    store, oc_distill = rate(distill, "engine_store"), rate(distill, "open_clip")
    ratio = lambda x, y: x / y if x and y else None  # noqa: E731
    out = [target("plain CLIP: engine samples/s / open_clip_train's >= 0.95", ratio(engine_plain, oc_plain), 0.95),
           target("distillation from the store: engine / the engine's own plain >= 0.95",
                  ratio(store, engine_plain), 0.95),
           target("distillation from the store: engine / open_clip_train --distill-model >= 2.5",
                  ratio(store, oc_distill), 2.5)]
    runs = distill.get("runs", {})
    oc_steps = [r for r in runs.get("open_clip", []) if r.get("breakdown")]
    store_steps = [r for r in runs.get("engine_store", []) if r.get("breakdown")]
    if oc_steps and store_steps and out[2]["value"] is not None:
        # the step-time ratio as two factors: the teacher's forward the store skips, and the rest of the two steps
        step, teacher = mean(r["step_s"] for r in oc_steps), mean(r["breakdown"]["teacher"] for r in oc_steps)
        ours = mean(r["step_s"] for r in store_steps)
        if step > teacher and ours:
            out[2]["teacher_factor"], out[2]["rest_factor"] = step / (step - teacher), (step - teacher) / ours
            out[2]["note"] += (f"; step times {step:.3g} s against {ours:.3g} s: skipping the teacher's forward "
                               f"({teacher:.3g} s) gives {out[2]['teacher_factor']:.2f}x, the rest of the step "
                               f"({step - teacher:.3g} s against {ours:.3g} s) {out[2]['rest_factor']:.2f}x")
    search = s.get("search", {})
    oc_max = search.get("open_clip", {}).get("largest_fitting")
    engine_max = search.get("engine", {}).get("largest_fitting")
    item = target("largest batch under the cap: engine / open_clip_train's (plain) >= 8", ratio(engine_max, oc_max), 8)
    if item["value"] is not None and search["engine"].get("smallest_failing") is None:
        item["note"] += " (a lower bound: the engine's search stopped before its memory did: " \
                        f"{search['engine'].get('stopped')})"
    out.append(item)
    loss = s.get("loss")
    if loss is not None:
        engine = loss.get("engine_online") or {}
        diff = engine.get("total_plus_entropy_diff")
        out.append({"target": f"step-0 loss equal within {LOSS_TOLERANCE:g}", "value": diff, "goal": LOSS_TOLERANCE,
                    "met": bool(loss.get("passed")),
                    "note": ("met" if loss.get("passed") else "missed") + (
                        f": |task - contrastive_loss| = {abs(engine['task_diff']):.1e}, |total + H - loss| = "
                        f"{abs(diff):.1e}; without the entropy term the totals differ by {engine['total_diff_raw']:.4f}"
                        if diff is not None else "")})
    return out


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def gib(value) -> str:
    return "-" if value is None else f"{value / GiB:.2f} GiB"


RUN_NAMES = {("plain", "open_clip"): "open_clip_train, plain CLIP",
             ("plain", "engine"): "engine --preset baseline --fused",
             ("distill", "open_clip"): "open_clip_train --distill-model",
             ("distill", "engine_store"): "engine, task + hrd from the store",
             ("distill", "engine_online"): "engine, task + hrd --online-teacher"}


def markdown(results: dict) -> str:
    s, st, m = results["sections"], results["settings"], results["machine"]
    label = " (measured under load)" if results.get("under_load") else ""
    lines = [f"# clip-rd and open_clip_train side by side{label}", "",
             f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB"
             + (f", GPU {m['gpu']['name']}" if m.get("gpu") else ", no GPU")
             + f"; torch {m['torch']}. 1-minute load average {results['load_1m_before']} before, "
               f"{results['load_1m_after']} after" + (
                 f" (read {st['after_pause_s']:g} s after the last run, when this run's own share has decayed; "
                 f"{results.get('load_1m_at_end')} at its end)" if "after_pause_s" in st else
                 " (right after the last run: its own processes count in it)")
             + (f". Other processes took {pct(results['others_cpu_share']['mean'])} of the CPUs during the runs on "
                f"average, {pct(results['others_cpu_share']['max'])} at most (one run)"
                if results.get("others_cpu_share") else "")
             + (f"; at or above {st['max_load']}, so these numbers were measured under load" if label else "") + ".",
             "", f"Student {st['student']}, teacher {st['teacher']}, {results['inputs']['image_size']}-pixel JPEG "
                 f"shards; batch {st['batch_size']}, --lr {st['lr']}, --precision {st['precision']}, --workers "
                 f"{st['workers']} for both tools; each run {st['warmup_steps']} warm-up + {st['steps']} measured "
                 f"steps, {st['repeats']} run(s) of each, interleaved. Total time {results['seconds']:.0f} s.", ""]
    lines += ["## Targets", "", "| target | value | result |", "| --- | --- | --- |"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {fmt(t['value'])} | {t['note']} |")
    loader = s.get("loader", {})
    if any(k in s for k in ("plain", "distill")):
        lines += ["", "## Throughput", "",
                  "samples/s over the measured steps (mean of the runs; each run's value in brackets), the tool's "
                  "own logged samples/s, and peak memory of the process tree (sum over the main process and its "
                  "workers; PSS counts shared pages once, RSS once per process).", "",
                  "| run | samples/s | runs | logged samples/s | loader alone, samples/s | peak PSS | peak RSS | "
                  "largest process |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (section, key), name in RUN_NAMES.items():
            runs = s.get(section, {}).get("runs", {}).get(key)
            if not runs:
                continue
            tool = "open_clip" if key == "open_clip" else "engine"
            loader_rate = loader.get(tool, {}).get("samples_per_s") if section == "plain" else None
            lines.append(f"| {name} | {fmt(mean(r.get('samples_per_s') for r in runs))} | "
                         f"{', '.join(fmt(r.get('samples_per_s')) for r in runs)} | "
                         f"{fmt(mean(r.get('logged_samples_per_s') for r in runs))} | {fmt(loader_rate)} | "
                         f"{gib(max((r['peak_tree_pss'] for r in runs), default=None))} | "
                         f"{gib(max((r['peak_tree_rss'] for r in runs), default=None))} | "
                         f"{gib(max((r['max_process_rss'] for r in runs), default=None))} |")
        pre = s.get("distill", {}).get("precompute")
        if pre:
            lines += ["", f"Teacher store: `engine.precompute` over the {pre['samples']} training samples took "
                          f"{pre['wall_s']:.1f} s (the whole process; it reports: {pre['reported']})."]
            payback = store_payback(results)
            if payback:
                lines += [f"Per epoch of N samples the store saves N x {payback['saved_per_sample_online_s']:.3g} s "
                          f"against the online teacher and N x {payback['saved_per_sample_open_clip_s']:.3g} s against "
                          f"open_clip_train --distill-model, and costs N x {payback['precompute_per_sample_s']:.3g} s "
                          f"once: it has paid for itself after {fmt(payback['epochs_vs_online'])} epoch(s) against "
                          f"the online teacher, {fmt(payback['epochs_vs_open_clip'])} against open_clip_train."]
    if loader and not s.get("plain"):
        lines += ["", "Loader alone, samples/s: " + ", ".join(
            f"{tool} {fmt(loader.get(tool, {}).get('samples_per_s'))}" for tool in ("open_clip", "engine")) + "."]
    breakdowns = breakdown_rows(results)
    if breakdowns:
        lines += ["", "## Step time, seconds per step", "",
                  "wait: from the previous step's end to the step's first operation (the batch, its transfer, the "
                  "tool's logging); teacher: the online teacher's forward or the store lookup; other: the rest (the "
                  "engine's gradient-norm check, open_clip's logit-scale clamp).", "",
                  "| run | " + " | ".join(PHASE_NAMES + ("other",)) + " | step |",
                  "| --- |" + " --- |" * (len(PHASE_NAMES) + 2)]
        for name, phases, step in breakdowns:
            lines.append(f"| {name} | " + " | ".join(fmt(phases[p]) for p in PHASE_NAMES + ("other",))
                         + f" | {fmt(step)} |")
    search = s.get("search")
    if search:
        lines += ["", "## Largest batch under the memory cap", "",
                  f"Cap {gib(search['cap_bytes'])} of {search['cap_kind']}; each probe {st['probe_steps']} steps. "
                  "open_clip_train refuses --accum-freq with --distill-model, so its search is plain CLIP; the "
                  "engine's is plain CLIP too, with --fused and --accum-freq (micro-batches of "
                  f"{search['engine'].get('micro_batch')}), starting at "
                  + (f"{st['engine_start']:g} times " if "engine_start" in st else "")
                  + "open_clip_train's largest batch. A probe whose estimated time would end past the time budget is "
                  "not run: a search stopped for time gives a lower bound.", "",
                  "| tool | largest that fits | smallest that does not | why the search stopped | probes (batch: "
                  "peak, result) |", "| --- | --- | --- | --- | --- |"]
        for tool in ("open_clip", "engine"):
            r = search.get(tool)
            if not r:
                continue
            probes = "; ".join(f"{p['batch']}: {gib(p['peak'])}, {'fits' if p['fits'] else p['reason']}"
                               for p in r["probes"])
            lines.append(f"| {tool} | {fmt(r['largest_fitting'])} | {fmt(r['smallest_failing'])} | "
                         f"{r['stopped'] or 'memory'} | {probes} |")
    loss = s.get("loss")
    if loss:
        lines += ["", "## Step-0 loss", "", loss_text(loss)]
    return "\n".join(lines) + "\n"


def loss_text(loss: dict) -> str:
    first = loss.get("open_clip")
    if not first or not loss.get("engine_online"):
        return f"Not measured: {loss.get('errors')}"
    rows = ["The same initial weights and the same first batch (one shard of exactly one batch of "
            f"{loss['batch']}): open_clip_train --distill-model logs loss = contrastive_loss + distill_loss, where "
            "distill_loss is the cross-entropy of the teacher's softmax against the student's log-softmax, both "
            "directions averaged (open_clip's DistillClipLoss). The engine's equivalent is task + hrd "
            "(`--preset baseline --hrd-weight 1`): task is CLIP's loss, and hrd is the KL divergence from the same "
            "teacher probabilities to the same student probabilities. Its gradients are open_clip's; its value is "
            "lower by the teacher's entropy H (cross-entropy = KL + H), a constant of the teacher. The engine has "
            "no term whose value is the cross-entropy itself, so the check adds H, computed from open_clip_train's "
            "own teacher outputs at that step.", "",
            "| | contrastive / task | distill_loss / hrd + H | loss / total + H | total - loss (raw) |",
            "| --- | --- | --- | --- | --- |",
            f"| open_clip_train (H = {first['teacher_entropy']:.6f}) | {first['contrastive_loss']:.6f} | "
            f"{first['distill_loss']:.6f} | {first['loss']:.6f} | |"]
    for key, name in (("engine_online", "engine --online-teacher"), ("engine_store", "engine, store (fp16 rows)")):
        e = loss.get(key)
        if not e or "task_diff" not in e:
            continue
        rows.append(f"| {name} | {e['task']:.6f} ({e['task_diff']:+.1e}) | {e['hrd'] + first['teacher_entropy']:.6f}"
                    f" ({e['hrd_plus_entropy_diff']:+.1e}) | {e['total'] + first['teacher_entropy']:.6f} "
                    f"({e['total_plus_entropy_diff']:+.1e}) | {e['total_diff_raw']:+.6f} |")
    agrees = loss.get("logged_matches_recorded")
    rows += ["", f"Check (online teacher, within {LOSS_TOLERANCE:g}): {'passed' if loss['passed'] else 'FAILED'}."
             + ("" if agrees is None else f" open_clip_train's logged loss (5 digits) "
                f"{'agrees' if agrees else 'DISAGREES'} with the value recorded in its process.")]
    return "\n".join(rows)


def breakdown_rows(results: dict) -> list[tuple[str, dict, float]]:
    s = results["sections"]
    rows = []
    for (section, key), name in RUN_NAMES.items():
        runs = s.get(section, {}).get("runs", {}).get(key, [])
        if section == "plain" and "breakdown_runs" in s.get("plain", {}):
            runs = [s["plain"]["breakdown_runs"][key]]
        runs = [r for r in runs if r.get("breakdown")]
        if runs:
            phases = {p: mean(r["breakdown"][p] for r in runs) for p in PHASE_NAMES + ("other",)}
            rows.append((name, phases, mean(r["step_s"] for r in runs)))
    return rows


def store_payback(results: dict) -> Optional[dict]:
    distill = results["sections"].get("distill", {})
    pre = distill.get("precompute")
    store, online, oc = (rate(distill, k) for k in ("engine_store", "engine_online", "open_clip"))
    if not (pre and pre.get("returncode") == 0 and store and online and oc):
        return None
    per_sample = pre["wall_s"] / pre["samples"]
    saved_online, saved_oc = 1 / online - 1 / store, 1 / oc - 1 / store
    return {"precompute_per_sample_s": per_sample, "saved_per_sample_online_s": saved_online,
            "saved_per_sample_open_clip_s": saved_oc,
            "epochs_vs_online": per_sample / saved_online if saved_online > 0 else None,
            "epochs_vs_open_clip": per_sample / saved_oc if saved_oc > 0 else None}


def plot(results: dict, path: Path) -> Optional[Path]:
    from engine.training.logger import pyplot

    plt = pyplot()
    if plt is None:
        return None
    s = results["sections"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    names, values = [], []
    for (section, key), name in RUN_NAMES.items():
        value = rate(s.get(section, {}), key)
        if value is not None:
            names.append(name.replace(", ", "\n")), values.append(value)
    axes[0].barh(names[::-1], values[::-1], color="tab:blue")
    axes[0].set_xlabel("samples/s")
    axes[0].set_title("throughput")
    rows = breakdown_rows(results)
    left = np.zeros(len(rows))
    for phase in PHASE_NAMES + ("other",):
        widths = np.array([max(r[1][phase], 0.0) for r in rows])
        axes[1].barh([r[0].replace(", ", "\n") for r in rows][::-1], widths[::-1], left=left[::-1], label=phase)
        left += widths
    axes[1].set_xlabel("seconds per step")
    axes[1].set_title("step time")
    if rows:
        axes[1].legend(fontsize=7)
    search = s.get("search", {})
    for index, tool in enumerate(("open_clip", "engine")):
        r = search.get(tool)
        if not r:
            continue
        for p in r["probes"]:
            axes[2].scatter(p["batch"], (p["peak"] or 0) / GiB, color="tab:green" if p["fits"] else "tab:red",
                            marker="o" if index == 0 else "s")
    if search:
        axes[2].axhline(search["cap_bytes"] / GiB, color="gray", linestyle="--", label="cap")
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("global batch (circles: open_clip_train,\nsquares: engine --accum-freq)")
        axes[2].set_ylabel("peak memory (GiB)")
        axes[2].set_title("batch search (green: fits)")
    label = " (measured under load)" if results.get("under_load") else ""
    fig.suptitle(f"clip-rd and open_clip_train{label}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "peer.md").write_text(markdown(results))
    plot(results, out / "peer.png")


# ------------------------------------------------------------------------------------------------------ the command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    a("--out", default=str(DEFAULT_OUT), help="results folder (peer.json, peer.md, peer.png)")
    a("--render", default=None, metavar="PEER_JSON", help="measure nothing: write --out's Markdown and plot again "
      "from this peer.json (targets recomputed)")
    a("--work-dir", default=None, help="data, weights, store and run folders (default: a temporary folder, removed "
      "at the end unless --keep)")
    a("--keep", action="store_true", help="keep the work folder and every run's logs and checkpoints")
    a("--smoke", action="store_true", help="tiny 32-pixel models, few steps, sections loss and plain: a proof that "
      "everything runs")
    a("--sections", default=None, help=f"comma-separated, of {','.join(SECTIONS)} (default: all; with --smoke: "
      "loss,plain)")
    a("--student", default=None, help="student model (default: ViT-T-16)")
    a("--teacher", default=None, help="teacher model (default: ViT-B-16)")
    a("--image-size", type=int, default=None, help="pixels of the generated JPEGs (default: 224)")
    a("--batch-size", type=int, default=None, help="batch of the throughput runs, both tools (default: 4 on a CPU, "
      "where the whole benchmark then takes about 17 min on 2 quiet cores; 256 on a GPU)")
    a("--warmup-steps", type=int, default=None, help="steps before the measured ones (default: 2 on a CPU, 5 on a "
      "GPU)")
    a("--steps", type=int, default=None, help="measured steps per run (default: 2 on a CPU, 20 on a GPU)")
    a("--repeats", type=int, default=None, help="runs of each tool and configuration, interleaved (default: 2; 1 "
      "with --smoke)")
    a("--shards", type=int, default=4, help="shards of the training data")
    a("--lr", type=float, default=5e-4, help="--lr of both tools")
    a("--precision", default=None, help="--precision of both tools (default: fp32 on a CPU, amp_bf16 on a GPU)")
    a("--workers", type=int, default=2, help="--workers of both tools")
    a("--seed", type=int, default=0, help="seed of data, weights and both tools")
    a("--loss-batch", type=int, default=8, help="batch of the step-0 loss check")
    a("--loss-store", action=argparse.BooleanOptionalAction, default=None,
      help="the step-0 loss check also from a teacher store (its fp16 rows; default: yes, except with --smoke)")
    a("--loader-batches", type=int, default=16, help="batches the loader-alone runs read")
    a("--precompute-batch", type=int, default=32, help="engine.precompute --batch-size")
    a("--cap-gib", type=float, default=None, help="memory cap of the batch search, GiB: of the process tree's PSS "
      "on a CPU, of the GPU on a GPU (default: 8; 3.5 on a CPU with fewer than 8 cores, where probes at 8 GiB take "
      "too long for the time budget)")
    a("--probe-steps", type=int, default=2, help="steps per probe of the batch search")
    a("--bisections", type=int, default=2, help="bisection steps after the doubling")
    a("--granularity", type=int, default=4, help="open_clip_train's probe batches are multiples of this")
    a("--engine-start", type=float, default=8.0,
      help="the engine's search starts at this multiple of open_clip_train's largest batch")
    a("--max-batch", type=int, default=1 << 16, help="no probe above this batch")
    a("--accum-time-factor", type=float, default=1.4,
      help="time of an --accum-freq step per sample relative to a plain one, for the probes' time estimates")
    a("--time-budget-s", type=float, default=1200, help="the batch search skips probes that would end after this "
      "many seconds from the start")
    a("--max-load", type=float, default=1.5, help="a 1-minute load average at or above this, before or after, "
      "labels the results as measured under load")
    a("--after-pause-s", type=float, default=None, help="seconds after the last run before the load is read again "
      "(default: 60; 0 with --smoke)")
    a("--wait-quiet-s", type=float, default=0, help="wait up to this long for the load to fall below --max-load "
      "before starting")
    a("--min-available-gib", type=float, default=1.5,
      help="a run is killed when the machine's available memory falls below this (the machine may be shared)")
    return p


def resolve_defaults(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    gpu = cuda
    small_cpu = not gpu and (os.cpu_count() or 1) < 8
    defaults = {"student": "ViT-T-16", "teacher": "ViT-B-16", "image_size": 224,
                "batch_size": 256 if gpu else 4, "warmup_steps": 5 if gpu else 2, "steps": 20 if gpu else 2,
                "precision": "amp_bf16" if gpu else "fp32", "cap_gib": 3.5 if small_cpu else 8.0,
                "sections": ",".join(SECTIONS), "repeats": 2, "loss_store": True, "after_pause_s": 60}
    if args.smoke:
        defaults.update({"student": "peer-smoke-student", "teacher": "peer-smoke-teacher", "image_size": 32,
                         "batch_size": 8, "warmup_steps": 1, "steps": 1, "precision": "fp32",
                         "sections": "loss,plain", "repeats": 1, "loss_store": False, "after_pause_s": 0})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = sorted(set(s.strip() for s in args.sections.split(",") if s.strip()) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"error: --sections: unknown section(s) {unknown}; expected {','.join(SECTIONS)}")
    for name in ("batch_size", "warmup_steps", "steps", "repeats", "shards", "loss_batch", "probe_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if (args.warmup_steps + args.steps) % max(args.workers, 1):
        raise SystemExit(f"error: --warmup-steps + --steps must be a multiple of --workers ({args.workers}): "
                         "open_clip_train gives every worker the same number of batches")
    return args


def main(argv=None) -> None:
    import torch

    args = parser().parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        results["targets"] = targets(results)
        write(results, Path(args.out))
        print(markdown(results))
        return
    args = resolve_defaults(args, torch.cuda.is_available())
    peer = Peer(args)
    try:
        results = peer.run()
        write(results, Path(args.out))
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(peer.work, ignore_errors=True)
    print(markdown(results))
    print(f"wrote {Path(args.out) / 'peer.json'}, peer.md, peer.png")


if __name__ == "__main__":
    main()
