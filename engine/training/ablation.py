"""The ablation (``python -m engine.ablate``), one of two studies, several seeds each:

- ``losses``: does relational distillation help? One student under each loss preset. Every (preset, seed) is one
  ``engine.train`` run with the fused backend (``--fused``) on the same data, teacher store and schedule; only the
  loss weights and the seed differ (the seed sets the student's initialisation and the sample order).
- ``reinforcement``: does MobileCLIP's dataset reinforcement help? The clip-rd student trained from a store of the
  evaluation view alone, from reinforced stores of K in {4, 16} views, from the online teacher with a new view of
  the same augmentation every epoch, and from a store of K = 4 views of a second teacher and of the two teachers'
  ensemble, on a subset small enough that every sample is seen at least 16 times.

Outputs under ``logs/<name>/``::

    ablation.json          the study and the settings shared by every run (a rerun with other settings is refused)
    runs.jsonl             one line per finished run: preset (the variant), seed, weights, steps, wall time, metrics
    runs/<preset>-seed<k>/ the engine's run layout (out.log, metrics.jsonl, checkpoints/, results.json)
    stores.json            reinforcement: each variant's store (bytes per sample, build time), built before any run
    table.md, table.csv    mean and standard deviation over seeds per preset, the teachers' own metrics, comparisons
    ablation.png           bar chart of the table
    equivalence/           losses: fused vs reference backend, same seed, per-step loss curves (equivalence.png, .json)
    ablate.log             one line per run

A rerun skips finished (preset, seed) runs and resumes an interrupted one from its ``epoch_latest.pt``.
``--quick`` is the CI-sized variant: a small procedural dataset and briefly trained teachers in the cache, 1 seed,
batch 32 (the losses study: 2 presets).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import sys
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from tqdm import tqdm

import models
from kernels import resolve_weights

from ..core.checkpoint import resumable
from ..core.errors import ConfigError, ShardError, UserError
from ..core.io import atomic_write_json
from ..data import synthetic
from ..data.embedded import cache_root, ensure_default_data
from ..data.shards import expand_urls, shard_sizes, steps_per_epoch
from ..evaluation.metrics import evaluate
from ..teachers import default as defaults
from ..teachers.manifest import read_manifest
from .config import TrainConfig
from .default_teacher import teacher_config
from .logger import pyplot
from .loop import run
from .prepare import resolve

# Each CLIP-RD term alone on top of CLIP-KD, next to the four named presets, and a SigLIP student (its own term
# SigLIP's, MobileCLIP2's sigmoid distillation from the CLIP teacher, whose targets take SigLIP's initial bias -10):
# (preset, weight overrides, other settings).
ABLATION_PRESETS: dict[str, tuple[str, dict, dict]] = {
    "baseline": ("baseline", {}, {}),
    "clip-kd": ("clip-kd", {}, {}),
    "clip-kd+vrd": ("clip-kd", {"vrd": 1.0}, {}),
    "clip-kd+xrd": ("clip-kd", {"xrd": 1.0}, {}),
    "clip-rd": ("clip-rd", {}, {}),
    "intra-kd": ("intra-kd", {}, {}),
    "siglip+sigmoid-kd": ("baseline", {"sigmoid_kd": 1.0}, {"siglip": True, "distill_logit_bias": -10.0}),
}
# The reinforcement study: where the clip-rd student's targets come from (TrainConfig overrides, "teachers" aside).
# Teacher "a" is the study's --teacher-pretrained (the shipped default teacher), "b" a second teacher of the same
# model and recipe trained with another seed, "a+b" the two as an ensemble (the mean of the per-teacher losses).
# Stored views: view 0 is the evaluation view, the other K - 1 drawn under the engine's default --aug-cfg, which the
# online teacher's fresh views (--online-augment) use too.
REINFORCEMENT_VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "no-aug": ("clip-rd", {}, {"augmentations": 0}),
    "store-k4": ("clip-rd", {}, {"augmentations": 4}),
    "store-k16": ("clip-rd", {}, {"augmentations": 16}),
    "online-aug": ("clip-rd", {}, {"online_teacher": True, "online_augment": True}),
    "store-k4-teacher-b": ("clip-rd", {}, {"augmentations": 4, "teachers": "b"}),
    "store-k4-ensemble": ("clip-rd", {}, {"augmentations": 4, "teachers": "a+b"}),
}
STUDIES = {"losses": ABLATION_PRESETS, "reinforcement": REINFORCEMENT_VARIANTS}
# reinforcement: the first shards of the embedded training data (4 of 16: 4 000 samples), seen 16 times each
REINFORCEMENT_SHARDS = 4
REINFORCEMENT_EPOCHS = 16
REINFORCEMENT_VAL_FREQUENCY = 4  # evaluations after epochs 4, 8, 12, 16 (each a pass over the validation data)
SECOND_TEACHER_SEED = 1
TABLE_METRICS = ("acc1", "acc5", "image_retrieval_recall@1", "image_retrieval_recall@5",
                 "text_retrieval_recall@1", "text_retrieval_recall@5")
SHORT_NAMES = {"acc1": "acc1", "acc5": "acc5", "image_retrieval_recall@1": "image R@1",
               "image_retrieval_recall@5": "image R@5", "text_retrieval_recall@1": "text R@1",
               "text_retrieval_recall@5": "text R@5"}
# Loss terms compared by the equivalence check (those clip-rd computes).
EQUIVALENCE_TERMS = ("total", "task", "fd", "icl", "hrd", "vrd", "xrd")
# Pass criterion: the trained objective (total) within this relative difference at every step, and every term within
# it at the first step (same weights and batch: pure fp32 arithmetic). Later per-term differences are reported, not
# bounded: the two runs' weights separate by rounding, and small terms (KLs near 0) magnify that (see the README).
EQUIVALENCE_RTOL = 1e-4
EQUIVALENCE_PRESET = "clip-rd"
# TrainConfig fields that identify one run rather than the ablation (excluded from the settings check).
PER_RUN_FIELDS = ("preset", "weights", "seed", "name", "resume", "logs", "progress", "loss_backend", "stop_after_steps",
                  "log_every_n_steps", "save_frequency", "eval", "siglip", "distill_logit_bias")
# --quick: a small procedural dataset and teacher, built once under <cache>/ablation-quick/.
QUICK_DATA = dict(train_samples=1024, val_samples=128, shard_size=128, seed=0)
QUICK_TEACHER = dict(epochs=2, batch_size=64, lr=2e-3, warmup=4)


@dataclass
class AblationSettings:
    base: TrainConfig  # the shared run configuration (data, models, schedule); preset/seed/name set per run
    study: str = "losses"  # a key of STUDIES: what the runs vary
    second_teacher: Optional[str] = None  # reinforcement: teacher "b"'s checkpoint (None: trained into the cache)
    presets: list[str] = field(default_factory=lambda: list(ABLATION_PRESETS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    logs: str = "./logs"
    name: str = "ablation"
    equivalence_steps: int = 200  # 0: skip the fused-vs-reference check
    verbose: bool = False

    @property
    def out_dir(self) -> Path:
        return Path(self.logs) / self.name

    @property
    def variants(self) -> dict[str, tuple[str, dict, dict]]:
        return STUDIES[self.study]


def run_id(preset: str, seed: int) -> str:
    return f"{preset}-seed{seed}"


def run_config(settings: AblationSettings, preset: str, seed: int) -> TrainConfig:
    """The engine config of one (preset, seed) run: fused backend, resumable, no per-step bar."""
    if preset not in settings.variants:
        raise ConfigError(f"--presets: unknown ablation preset {preset!r} for --study {settings.study}; expected "
                          f"some of {list(settings.variants)}")
    engine_preset, extra, settings_of_preset = settings.variants[preset]
    settings_of_preset = dict(settings_of_preset)
    teachers = teacher_fields(settings, settings_of_preset.pop("teachers", "a"))
    logs, name = str(settings.out_dir / "runs"), run_id(preset, seed)
    return replace(settings.base, preset=engine_preset, weights={**settings.base.weights, **extra}, seed=seed,
                   loss_backend="auto", logs=logs, name=name, resume=resumable(logs, name), progress=settings.verbose,
                   **settings_of_preset, **teachers)


def teacher_fields(settings: AblationSettings, teachers: str) -> dict:
    """The --teacher / --teacher-pretrained of teacher "a" (the base's), "b" (the second) or their ensemble "a+b"."""
    if teachers == "a":
        return {}
    if settings.second_teacher is None:
        raise ConfigError("the reinforcement study's second teacher is not prepared (--second-teacher-pretrained)")
    if teachers == "b":
        return {"teacher_pretrained": settings.second_teacher}
    base = settings.base
    return {"teacher": [base.teacher, base.teacher],
            "teacher_pretrained": [defaults.teacher_weights(base.teacher, base.teacher_pretrained),
                                   settings.second_teacher]}


def shared_settings(settings: AblationSettings) -> dict:
    shared = {k: v for k, v in asdict(settings.base).items() if k not in PER_RUN_FIELDS}
    if settings.study != "losses":  # (the losses study's records predate the studies: their keys stay as they were)
        shared.update(study=settings.study, second_teacher=settings.second_teacher)
    return shared


def check_settings(settings: AblationSettings) -> None:
    """Write ablation.json, or refuse to mix runs made with different shared settings into one table."""
    path = settings.out_dir / "ablation.json"
    shared = shared_settings(settings)
    if path.exists():
        try:
            found = json.loads(path.read_text())["shared"]
            if not isinstance(found, dict):
                raise TypeError("'shared' is not a mapping")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable or damaged ({type(exc).__name__}: {exc}); "
                              "pass another --name or delete the folder") from exc
        # a setting the record lacks was added to the engine after it was written: it ran with that setting's default
        defaults = asdict(TrainConfig())
        diff = {k: (found.get(k, defaults.get(k)), v) for k, v in shared.items() if found.get(k, defaults.get(k)) != v}
        if diff:
            raise ConfigError(f"{settings.out_dir} holds runs made with other settings (was, now): {diff}; "
                              "pass another --name or delete it")
        return
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    record = {"shared": shared, "presets": dict(settings.variants)}
    atomic_write_json(path, record)


class _Discard:
    """A stdout sink for the engine's per-step log lines (they stay in each run's out.log)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _quiet(verbose: bool):
    return nullcontext() if verbose else redirect_stdout(_Discard())


def _logger(out_dir: Path) -> logging.Logger:
    log = logging.getLogger("ablate")
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(out_dir / "ablate.log")):
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


# --- the runs ---------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def train_one(settings: AblationSettings, preset: str, seed: int, log: logging.Logger) -> dict:
    """Train (or resume) one run and return its runs.jsonl record."""
    cfg = run_config(settings, preset, seed)
    run_dir = Path(cfg.logs) / cfg.name
    results = run_dir / "results.json"
    start = time.perf_counter()
    if results.exists() and json.loads(results.read_text()).get("metrics"):  # finished, record lost: recover it
        result, wall = json.loads(results.read_text()), None
        log.info(f"{cfg.name}: found finished run {run_dir}")
    else:
        if run_dir.exists() and not (run_dir / "checkpoints" / "epoch_latest.pt").exists():
            shutil.rmtree(run_dir)  # stopped before its first checkpoint: start clean (no stale log rows)
        with _quiet(settings.verbose):
            result = run(cfg, resolve(cfg, progress=False)).to_json()
        wall = time.perf_counter() - start
    if not result.get("metrics"):
        raise UserError(f"run {run_dir} finished without evaluation metrics (no validation data?)")
    return {"preset": preset, "seed": seed, "engine_preset": cfg.preset, "weights": resolve_weights(cfg.loss_weights()),
            "run_dir": str(run_dir), "steps": result.get("steps"), "wall_s": wall,
            "mean_step_s": result.get("mean_step_s"), "mean_data_s": result.get("mean_data_s"),
            "metrics": result["metrics"]}


def run_all(settings: AblationSettings, log: logging.Logger) -> list[dict]:
    """Every (preset, seed) of the settings, skipping the finished ones; returns their records."""
    jsonl = settings.out_dir / "runs.jsonl"
    done = {(r["preset"], r["seed"]): r for r in read_jsonl(jsonl)}
    todo = [(p, s) for s in settings.seeds for p in settings.presets]
    bar = tqdm(total=len(todo), desc="ablation runs", unit="run", disable=settings.verbose)
    for index, (preset, seed) in enumerate(todo, start=1):
        if (preset, seed) in done:
            log.info(f"[{index}/{len(todo)}] {run_id(preset, seed)}: finished earlier, skipped")
        else:
            record = train_one(settings, preset, seed, log)
            append_jsonl(jsonl, record)
            done[(preset, seed)] = record
            m = record["metrics"]
            log.info(f"[{index}/{len(todo)}] {run_id(preset, seed)}: {record['steps']} steps"
                     + (f" in {record['wall_s']:.0f} s" if record["wall_s"] is not None else "")
                     + " | " + " ".join(f"{SHORT_NAMES[k]} {m[k]:.3f}" for k in TABLE_METRICS if k in m))
        bar.update(1)
    bar.close()
    return [done[key] for key in todo]


# --- quick variant: small data and teacher ------------------------------------------------------------------------


def prepare_quick(base: TrainConfig, log: logging.Logger, verbose: bool = False) -> TrainConfig:
    """Build (once) a small dataset and a briefly trained teacher under <cache>/ablation-quick; point base at them."""
    root = cache_root(base.cache_dir) / "ablation-quick"
    patterns = synthetic.build(root / "data", synthetic.SyntheticSpec(**QUICK_DATA), progress=False)
    base = replace(base, train_data=patterns["train"], val_data=patterns["val"])
    if base.teacher_pretrained is None and base.teacher_store is None:
        base = replace(base, teacher_pretrained=quick_teacher(base, 0, log, verbose))
    return base


def quick_teacher(base: TrainConfig, seed: int, log: logging.Logger, verbose: bool) -> str:
    """--quick's teacher of this seed (trained once, briefly, on base's data into the cache): its checkpoint."""
    logs = str(cache_root(base.cache_dir) / "ablation-quick" / "teacher")
    name = base.teacher + (f"-seed{seed}" if seed else "")  # seed 0: the name the quick teacher always had
    cfg = replace(base, model=base.teacher, teacher_pretrained=None, preset="baseline", weights={},
                  loss_backend="auto", logs=logs, name=name, resume=resumable(logs, name), progress=False, seed=seed,
                  **QUICK_TEACHER)
    return train_teacher(cfg, f"--quick: training a small teacher ({QUICK_TEACHER['epochs']} epochs, seed {seed})",
                         log, verbose)


def second_teacher(settings: AblationSettings, quick: bool, log: logging.Logger) -> str:
    """The reinforcement study's teacher "b": the first teacher's recipe with seed SECOND_TEACHER_SEED (--quick's,
    or the shipped default teacher's on the embedded data), trained once into the cache; its checkpoint."""
    if quick:
        return quick_teacher(settings.base, SECOND_TEACHER_SEED, log, settings.verbose)
    recipe = teacher_config(cache_root(settings.base.cache_dir), progress=False)
    name = f"{recipe.name}-seed{SECOND_TEACHER_SEED}"  # beside the default teacher's run
    cfg = replace(recipe, seed=SECOND_TEACHER_SEED, name=name, resume=resumable(recipe.logs, name))
    return train_teacher(cfg, f"training the second teacher ({cfg.model}, the default teacher's recipe, "
                              f"{cfg.epochs} epochs, seed {SECOND_TEACHER_SEED}; ~5 minutes on 2 idle cores)",
                         log, settings.verbose)


def train_teacher(cfg: TrainConfig, message: str, log: logging.Logger, verbose: bool) -> str:
    """Train (or resume, or find finished) the teacher run ``cfg``; its final checkpoint."""
    run_dir = Path(cfg.logs) / cfg.name
    if not (run_dir / "results.json").exists():
        log.info(f"{message} in {run_dir}")
        with _quiet(verbose):
            run(cfg, resolve(cfg, progress=False))
    return str(run_dir / "checkpoints" / "epoch_latest.pt")


def reinforcement_data(base: TrainConfig) -> TrainConfig:
    """The reinforcement study's default data: the first REINFORCEMENT_SHARDS shards of the embedded training data
    and its validation split (a given --train-data / --val-data is kept)."""
    if base.train_data is not None:
        return base
    patterns = ensure_default_data(cache_root(base.cache_dir))
    urls = expand_urls(patterns["train"])[:REINFORCEMENT_SHARDS]
    folder, names = Path(urls[0]).parent, [Path(u).stem for u in urls]
    subset = str(folder / f"train-{{{names[0].split('-')[-1]}..{names[-1].split('-')[-1]}}}.tar")
    if expand_urls(subset) != urls:
        raise ShardError(f"the embedded training shards {urls} are not one numbered range")
    return replace(base, train_data=subset, val_data=base.val_data or patterns["val"])


def prepare_stores(settings: AblationSettings, log: logging.Logger) -> dict:
    """Each variant's teacher store, built before any run (so that no run's time includes one): per variant its
    folder, bytes per sample and build seconds (None: found in the cache). Written to stores.json."""
    path = settings.out_dir / "stores.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    for preset in settings.presets:
        cfg = run_config(settings, preset, settings.seeds[0])
        if cfg.online_teacher:
            continue
        start, clock = time.perf_counter(), time.time()
        sources = resolve(replace(cfg, progress=True), progress=True)
        seconds = time.perf_counter() - start
        built_now = (sources.store_dir / "manifest.json").stat().st_mtime >= clock  # else found in the cache
        manifest = read_manifest(sources.store_dir)
        samples = manifest["count"]
        size = sum(f.stat().st_size for f in sources.store_dir.rglob("*") if f.is_file())
        built = round(seconds, 1) if built_now else found.get(preset, {}).get("build_s")
        found[preset] = {"store": str(sources.store_dir), "views": manifest["augmentation"]["views"],
                         "teachers": len(manifest["teachers"]), "samples": samples,
                         "bytes_per_sample": round(size / samples), "build_s": built}
        log.info(f"{preset}: store {sources.store_dir.name}, {found[preset]['bytes_per_sample']} bytes per sample"
                 + (f", built in {built:.0f} s" if built else ", from the cache"))
    atomic_write_json(path, found)
    return found


# --- teacher reference row ----------------------------------------------------------------------------------------


def teacher_records(settings: AblationSettings, log: logging.Logger) -> list[dict]:
    """The reference rows of the table: the teacher (and the reinforcement study's second teacher) with its own
    metrics on the validation data."""
    if settings.study == "losses":
        rows = [("teacher", "clip-kd", "teacher.json")]
    else:
        rows = [("teacher", "no-aug", "teacher.json"), ("teacher-b", "store-k4-teacher-b", "teacher-b.json")]
    records = [teacher_metrics(settings, log, *row) for row in rows]
    return [record for record in records if record is not None]


def teacher_metrics(settings: AblationSettings, log: logging.Logger, row: str, preset: str,
                    file_name: str) -> Optional[dict]:
    """One teacher's own metrics on the validation data (cached in ``file_name``, else its recorded evaluation or
    evaluated once), as the table row ``row``."""
    cache_file = settings.out_dir / file_name
    if cache_file.exists():
        return {"row": row, **json.loads(cache_file.read_text())}
    cfg = replace(run_config(settings, preset, settings.seeds[0]), progress=True)
    if settings.study == "reinforcement":  # its stores are built by prepare_stores: the teacher and the data alone
        cfg = replace(cfg, online_teacher=True, online_augment=False, augmentations=None)
    log.info("resolving data, teacher and teacher store (built once into the cache when absent: on 2 idle cores "
             "the embedded data take ~10 s, the teacher store ~30 s)")
    sources = resolve(cfg, progress=cfg.progress)  # before any run, so that no run builds them
    if len(sources.teachers) != 1 or sources.val is None:  # engine.ablate takes one --teacher
        return None
    model, pretrained, _ = sources.teachers[0]
    if sources.teacher_metrics is not None:  # the shipped default teacher's recorded evaluation
        metrics = sources.teacher_metrics
    else:
        teacher = models.create_teacher(model, pretrained)
        metrics = evaluate(teacher, models.get_preprocess(teacher), models.get_tokenizer(model), sources.val)
    record = {"model": model, "pretrained": pretrained, "metrics": metrics}
    cache_file.write_text(json.dumps(record, indent=1))
    return {"row": row, **record}


# --- table, comparisons, chart ------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(records: list[dict], presets: list[str]) -> dict[str, dict]:
    """preset -> {"n": seeds, "seeds": [...], metric: (mean, std) for every metric the runs report}."""
    table = {}
    for preset in presets:
        rows = [r for r in records if r["preset"] == preset]
        if not rows:
            continue
        metrics = [k for k in rows[0]["metrics"] if all(k in r["metrics"] for r in rows)]
        table[preset] = {"n": len(rows), "seeds": sorted(r["seed"] for r in rows),
                         **{k: mean_std([r["metrics"][k] for r in rows]) for k in metrics}}
    return table


def compare(table: dict, better: str, worse: str, metric: str) -> Optional[dict]:
    """Difference of means and whether it exceeds two standard deviations (the larger of the two presets' stds)."""
    if better not in table or worse not in table or metric not in table[better] or metric not in table[worse]:
        return None
    (m1, s1), (m2, s2) = table[better][metric], table[worse][metric]
    spread = max(s1, s2)
    return {"a": better, "b": worse, "metric": metric, "delta": m1 - m2, "std": spread,
            "sigmas": (m1 - m2) / spread if spread > 0 else None,
            "beyond_2_std": m1 - m2 > 2 * spread and table[better]["n"] > 1 and table[worse]["n"] > 1}


# reinforcement: (A, B) pairs of the table, A - B
REINFORCEMENT_COMPARISONS = (("store-k4", "no-aug"), ("store-k16", "no-aug"), ("store-k16", "store-k4"),
                             ("online-aug", "no-aug"), ("store-k4", "online-aug"), ("store-k16", "online-aug"),
                             ("store-k4-ensemble", "store-k4"), ("store-k4-ensemble", "store-k4-teacher-b"))


def comparisons(table: dict, study: str = "losses") -> list[dict]:
    if study == "reinforcement":
        pairs = list(REINFORCEMENT_COMPARISONS)
    else:
        pairs = [(p, "baseline") for p in table if p != "baseline"] + [("clip-rd", "clip-kd"),
                                                                       ("clip-kd+vrd", "clip-kd"),
                                                                       ("clip-kd+xrd", "clip-kd")]
    out = [compare(table, a, b, m) for a, b in pairs for m in TABLE_METRICS]
    return [c for c in out if c is not None]


def _cell(value: tuple[float, float]) -> str:
    return f"{value[0]:.3f} ± {value[1]:.3f}"


def write_table(out_dir: Path, table: dict, teachers: list[dict], comps: list[dict],
                stores: Optional[dict] = None) -> tuple[Path, Path]:
    header = "| preset | seeds | " + " | ".join(SHORT_NAMES[m] for m in TABLE_METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(TABLE_METRICS) + 2)]
    for teacher in teachers:
        t = teacher["metrics"]
        lines.append(f"| {teacher['row']} `{teacher['model']}` (reference) | - | "
                     + " | ".join(f"{t[m]:.3f}" if m in t else "-" for m in TABLE_METRICS) + " |")
    for preset, row in table.items():
        lines.append(f"| {preset} | {row['n']} | " + " | ".join(_cell(row[m]) if m in row else "-"
                                                             for m in TABLE_METRICS) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds (ddof 1). Below, per comparison A - B: the difference "
              "of the means and, in parentheses, that difference in units of the larger of the two standard "
              "deviations; **bold** when it exceeds 2 (A beats B by more than two standard deviations).", "",
              "| A - B | " + " | ".join(SHORT_NAMES[m] for m in TABLE_METRICS) + " |",
              "|" + " --- |" * (len(TABLE_METRICS) + 1)]
    by_pair: dict[tuple, dict] = {}
    for c in comps:
        by_pair.setdefault((c["a"], c["b"]), {})[c["metric"]] = c
    for (a, b), cells in by_pair.items():
        text = []
        for m in TABLE_METRICS:
            c = cells.get(m)
            sigmas = "-" if c is None or c["sigmas"] is None else format(c["sigmas"], "+.1f")
            cell = "-" if c is None else f"{c['delta']:+.3f} ({sigmas})"
            text.append(f"**{cell}**" if c is not None and c["beyond_2_std"] else cell)
        lines.append(f"| {a} - {b} | " + " | ".join(text) + " |")
    if stores:  # the reinforcement study: what each store costs
        lines += ["", "Teacher stores, built before the runs (bytes per sample: the store folder over its samples; "
                  "build time: wall seconds on this machine, blank when the store came from the cache):", "",
                  "| variant | views | teachers | samples | bytes per sample | build s |", "|" + " --- |" * 6]
        for preset, record in stores.items():
            built = "" if record["build_s"] is None else f"{record['build_s']:.0f}"
            lines.append(f"| {preset} | {record['views']} | {record['teachers']} | {record['samples']} | "
                         f"{record['bytes_per_sample']} | {built} |")
    md = out_dir / "table.md"
    md.write_text("\n".join(lines) + "\n")
    metrics = sorted({m for row in table.values() for m in row if m not in ("n", "seeds")},
                     key=lambda m: (TABLE_METRICS.index(m) if m in TABLE_METRICS else len(TABLE_METRICS), m))
    path = out_dir / "table.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["preset", "seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")])
        for teacher in teachers:
            writer.writerow([teacher["row"], ""] + [v for m in metrics for v in (teacher["metrics"].get(m, ""), "")])
        for preset, row in table.items():
            writer.writerow([preset, row["n"]] + [f"{v:.6f}" if m in row else "" for m in metrics
                                                  for v in (row[m] if m in row else ("", ""))])
    return md, path


def plot_table(path: Path, table: dict, teachers: list[dict], title: str) -> Path:
    """Grouped bars: one group per metric, one bar per preset (mean, std as error bar), each teacher a line."""
    plt = pyplot()
    if plt is None:
        return None

    presets = list(table)
    fig, ax = plt.subplots(figsize=(13, 4.8))
    width = 0.8 / max(len(presets), 1)
    for i, preset in enumerate(presets):
        xs = [j + (i - (len(presets) - 1) / 2) * width for j in range(len(TABLE_METRICS))]
        means = [table[preset].get(m, (float("nan"), 0))[0] for m in TABLE_METRICS]
        stds = [table[preset].get(m, (0, 0))[1] for m in TABLE_METRICS]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"{preset} (n={table[preset]['n']})")
    for teacher, style in zip(teachers, ("dashed", "dotted")):
        for j, m in enumerate(TABLE_METRICS):
            if m in teacher["metrics"]:
                ax.hlines(teacher["metrics"][m], j - 0.45, j + 0.45, colors="black", linestyles=style,
                          label=teacher["row"] if j == 0 else None)
    ax.set_xticks(range(len(TABLE_METRICS)), [SHORT_NAMES[m] for m in TABLE_METRICS])
    ax.set_ylim(0, 1.18)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(len(presets) + len(teachers), 5), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- fused vs reference equivalence -------------------------------------------------------------------------------


def epochs_for_steps(cfg: TrainConfig, steps: int) -> int:
    """Smallest epoch count (at least cfg.epochs) whose schedule has ``steps`` steps."""
    urls = expand_urls(cfg.train_data)
    sizes = shard_sizes(urls)
    total, epochs = 0, 0
    while total < steps or epochs < cfg.epochs:
        total += steps_per_epoch(urls, sizes, cfg.batch_size, cfg.seed, epochs, 1, cfg.workers)
        epochs += 1
    return epochs


def train_curves(settings: AblationSettings, fused: bool, steps: int, train_data: str) -> list[dict]:
    """Per-step train rows of a clip-rd run with the given backend, stopped after ``steps`` steps."""
    cfg = replace(run_config(settings, EQUIVALENCE_PRESET, settings.seeds[0]), train_data=train_data)
    cfg = replace(cfg, loss_backend="auto" if fused else "reference", logs=str(settings.out_dir / "equivalence"),
                  name="fused" if fused else "reference", resume=None, log_every_n_steps=1, eval=False,
                  stop_after_steps=steps, save_frequency=10**9, epochs=epochs_for_steps(cfg, steps))
    metrics_file = Path(cfg.logs) / cfg.name / "metrics.jsonl"
    rows = [r for r in read_jsonl(metrics_file) if r["kind"] == "train"]
    if len(rows) < steps:  # absent or interrupted: the per-step rows must come from one uninterrupted run
        shutil.rmtree(Path(cfg.logs) / cfg.name, ignore_errors=True)
        with _quiet(settings.verbose):
            run(cfg, resolve(cfg, progress=False))
        rows = [r for r in read_jsonl(metrics_file) if r["kind"] == "train"]
    return rows[:steps]


def compare_curves(fused: list[dict], reference: list[dict], terms=EQUIVALENCE_TERMS) -> dict:
    """Per term: the largest relative and absolute difference over the logged steps, and at the first step."""
    if [r["step"] for r in fused] != [r["step"] for r in reference]:
        raise ConfigError("fused and reference runs logged different steps")
    out = {}
    for term in terms:
        pairs = [(f[term], r[term]) for f, r in zip(fused, reference) if term in f and term in r]
        if not pairs:
            continue
        rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in pairs]
        out[term] = {"max_rel": max(rel), "max_abs": max(abs(a - b) for a, b in pairs), "first_step_rel": rel[0],
                     "worst_step": fused[rel.index(max(rel))]["step"]}
    return out


def equivalence(settings: AblationSettings, log: logging.Logger, rtol: float = EQUIVALENCE_RTOL) -> dict:
    """Train the same seed with the fused and the reference backend; compare and plot the per-step loss curves."""
    steps = settings.equivalence_steps
    sources = resolve(run_config(settings, EQUIVALENCE_PRESET, settings.seeds[0]), progress=False)
    start = time.perf_counter()
    fused = train_curves(settings, True, steps, sources.train)
    reference = train_curves(settings, False, steps, sources.train)
    diffs = compare_curves(fused, reference)
    result = {"preset": EQUIVALENCE_PRESET, "seed": settings.seeds[0], "steps": len(fused), "rtol": rtol,
              "passed": diffs["total"]["max_rel"] <= rtol and all(d["first_step_rel"] <= rtol for d in diffs.values()),
              "terms": diffs,
              "wall_s": time.perf_counter() - start}
    out = settings.out_dir / "equivalence"
    (out / "equivalence.json").write_text(json.dumps(result, indent=1))
    plot_equivalence(out / "equivalence.png", fused, reference, diffs, rtol)
    worst = max(diffs.items(), key=lambda kv: kv[1]["max_rel"])
    log.info(f"equivalence fused vs reference, {len(fused)} steps of {EQUIVALENCE_PRESET}: total loss within "
             f"{diffs['total']['max_rel']:.2e} relative at every step, terms at step 1 within "
             f"{max(d['first_step_rel'] for d in diffs.values()):.2e} (tolerance {rtol:.0e}: "
             f"{'passed' if result['passed'] else 'FAILED'}); largest per-term difference {worst[1]['max_rel']:.2e} "
             f"({worst[0]}, step {worst[1]['worst_step']})")
    return result


def plot_equivalence(path: Path, fused: list[dict], reference: list[dict], diffs: dict, rtol: float) -> Path:
    plt = pyplot()
    if plt is None:
        return None

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    steps = [r["step"] for r in fused]
    top.plot(steps, [r["total"] for r in reference], label="reference backend", linewidth=3, alpha=0.5)
    top.plot(steps, [r["total"] for r in fused], label="fused backend (--fused)", linewidth=1, linestyle="--")
    top.set_ylabel("total loss")
    top.set_title(f"{EQUIVALENCE_PRESET}, same seed: fused vs reference backend")
    top.legend()
    for term in diffs:
        rel = [max(abs(f[term] - r[term]) / max(abs(r[term]), 1e-12), 1e-12) for f, r in zip(fused, reference)]
        bottom.plot(steps, rel, label=term, linewidth=1)
    bottom.axhline(rtol, color="black", linestyle="dashed", label=f"tolerance {rtol:.0e} (total; terms at step 1)")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_ylabel("|fused - reference| / |reference|")
    bottom.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- entry point --------------------------------------------------------------------------------------------------


def validate(settings: AblationSettings) -> None:
    """Every flag and input, checked before anything is written or built: one line naming the flag."""
    if settings.study not in STUDIES:
        raise ConfigError(f"--study: {settings.study!r} is not one of {list(STUDIES)}")
    unknown = [p for p in settings.presets if p not in settings.variants]
    if unknown:
        raise ConfigError(f"--presets: unknown ablation preset(s) {unknown} for --study {settings.study}; expected "
                          f"some of {list(settings.variants)}")
    if settings.study == "reinforcement" and settings.equivalence_steps:
        raise ConfigError("--equivalence-steps: the fused-vs-reference check belongs to the losses study; pass 0")
    if settings.second_teacher is not None and not Path(settings.second_teacher).is_file():
        raise ConfigError(f"--second-teacher-pretrained: checkpoint file {settings.second_teacher} does not exist")
    if settings.equivalence_steps < 0:
        raise ConfigError(f"--equivalence-steps: must be >= 0 (0 skips the check), got {settings.equivalence_steps}")
    settings.base.validate()
    for flag, name in (("--model", settings.base.model), ("--teacher", settings.base.teacher)):
        try:
            models.model_config(name)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from exc
    given = {"--train-data": settings.base.train_data, "--val-data": settings.base.val_data}
    for flag, pattern in ((flag, pattern) for flag, pattern in given.items() if pattern is not None):
        try:
            expand_urls(pattern)
        except ShardError as exc:
            raise ShardError(f"{flag}: {exc}") from exc


def ablate(settings: AblationSettings, quick: bool = False) -> dict:
    validate(settings)
    try:
        settings.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--logs {settings.logs}: cannot create {settings.out_dir} ({exc.strerror})") from exc
    log = _logger(settings.out_dir)
    start = time.perf_counter()
    if quick:
        settings = replace(settings, base=prepare_quick(settings.base, log, settings.verbose))
    stores = None
    if settings.study == "reinforcement":
        settings = replace(settings, base=reinforcement_data(settings.base))
        if settings.second_teacher is None:
            settings = replace(settings, second_teacher=second_teacher(settings, quick, log))
    check_settings(settings)
    log.info(f"ablation {settings.out_dir}: {settings.study} study, presets {settings.presets}, seeds "
             f"{settings.seeds}, {settings.base.epochs} epochs, batch {settings.base.batch_size}, fused backend; "
             f"shared settings {shared_settings(settings)}")
    if settings.study == "reinforcement":
        stores = prepare_stores(settings, log)
    teachers = teacher_records(settings, log)
    records = run_all(settings, log)
    table = summarise(records, settings.presets)
    comps = comparisons(table, settings.study)
    md, csv_path = write_table(settings.out_dir, table, teachers, comps, stores)
    title = {"losses": "student under each loss preset: mean ± std over seeds",
             "reinforcement": "clip-rd student by source of the teacher's targets: mean ± std over seeds"}
    chart = plot_table(settings.out_dir / "ablation.png", table, teachers, title[settings.study])
    summary = {"study": settings.study, "table": {p: {k: v for k, v in row.items()} for p, row in table.items()},
               "teacher": teachers[0] if teachers else None, "teachers": teachers, "stores": stores,
               "comparisons": comps}
    if settings.equivalence_steps > 0:
        summary["equivalence"] = equivalence(settings, log)
    summary["wall_s"] = time.perf_counter() - start
    (settings.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info(f"table {md} ({csv_path.name}); chart {chart}; runs {settings.out_dir / 'runs.jsonl'}; "
             f"wall time {summary['wall_s']:.0f} s\n" + md.read_text())
    return summary
