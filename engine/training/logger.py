"""Run outputs under logs/<name>/: params.txt, out.log, metrics.jsonl, tensorboard/ (--report-to tensorboard),
plots."""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from ..core.errors import ConfigError
from ..core.io import atomic_write_text


def setup_logging(log_file: Path | None, is_main: bool = True) -> logging.Logger:
    logger = logging.getLogger("engine")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", "%Y-%m-%d,%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def write_params(path: Path, cfg) -> None:
    with open(path, "w") as handle:
        for key, value in sorted(asdict(cfg).items()):
            handle.write(f"{key}: {value}\n")


def summary_writer_class():
    """TensorBoard's SummaryWriter; a one-line ConfigError naming --report-to when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard extra
    except ImportError as exc:
        raise ConfigError("--report-to tensorboard: the tensorboard package is not installed; "
                          "pip install -e '.[tensorboard]'") from exc
    return SummaryWriter


class MetricsWriter:
    """One JSON object per line (``kind`` = train | val | eval), mirrored to TensorBoard with ``tensorboard``."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = False):
        """``resume_step``: rows after this step (written by a run that went on past its last checkpoint) are
        dropped, so that a resumed run's file holds every step once. ``tensorboard``: also write event files to
        ``run_dir/tensorboard`` (scalars tagged ``<kind>/<name>``)."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if enabled and resume_step is not None and self.path.exists():
            kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept), "metrics")
        if enabled and tensorboard:
            self.tensorboard = summary_writer_class()(str(run_dir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with one warning) when the optional matplotlib is missing."""
    try:
        import matplotlib  # optional: the plots extra
    except ImportError:
        logging.getLogger("engine").warning("matplotlib is not installed, so no PNG is written: "
                                            "pip install -e '.[plots]'")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(metrics_file: Path, out_file: Path) -> Path | None:
    """PNG: one small panel per loss term over steps (each on its own scale, so none hides another), the
    per-epoch validation metrics over epochs, and the final evaluation as bars."""
    plt = pyplot()
    if plt is None:
        return None
    rows = read_metrics(metrics_file)
    train = [r for r in rows if r["kind"] == "train"]
    vals = [r for r in rows if r["kind"] == "val"]
    evals = [r for r in rows if r["kind"] == "eval"]
    terms = [k for k in train[-1] if k not in TRAIN_NON_TERMS] if train else []
    columns = 4
    panels = len(terms) + 2  # the terms, validation over epochs, the final evaluation
    fig, axes = plt.subplots(-(-panels // columns), columns, figsize=(4 * columns, 2.8 * -(-panels // columns)),
                             squeeze=False)
    axes = list(axes.flat)
    for axis, term in zip(axes, terms):
        axis.plot([r["step"] for r in train if term in r], [r[term] for r in train if term in r], linewidth=1)
        axis.set_title("total (weighted sum)" if term == "total" else term, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
    _plot_validation(axes[len(terms)], vals)
    _plot_final(axes[len(terms) + 1], evals)
    for axis in axes[panels:]:
        axis.set_axis_off()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


TRAIN_NON_TERMS = ("kind", "step", "epoch", "lr", "logit_scale", "samples_per_s", "step_s", "data_s")
METRIC_NON_VALUES = ("kind", "step", "epoch")


def _plot_validation(axis, vals: list[dict]) -> None:
    """Each validation metric over the epochs after which it was evaluated."""
    names = [k for k in vals[-1] if k not in METRIC_NON_VALUES] if vals else []
    for name in names:
        points = [(r["epoch"], r[name]) for r in vals if name in r]
        axis.plot(*zip(*points), marker="o", markersize=3, linewidth=1, label=name)
    axis.set_title("validation after each epoch" if names else "no per-epoch validation", fontsize=9)
    axis.set_xlabel("epoch", fontsize=8)
    axis.set_ylim(0, 1)
    axis.tick_params(labelsize=7)
    axis.xaxis.get_major_locator().set_params(integer=True)
    if names:
        axis.legend(fontsize=5, loc="lower right", ncol=2)


def _plot_final(axis, evals: list[dict]) -> None:
    if not evals:
        axis.set_axis_off()
        return
    last = evals[-1]
    names = [k for k in last if k not in METRIC_NON_VALUES]
    axis.bar(range(len(names)), [last[k] for k in names])
    axis.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=6)
    axis.set_ylim(0, 1)
    axis.set_title(f"final evaluation (step {last['step']})", fontsize=9)
