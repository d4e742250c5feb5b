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
    """PNG: each loss term over steps (left) and the evaluation metrics (right, bars)."""
    plt = pyplot()
    if plt is None:
        return None

    rows = read_metrics(metrics_file)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    skip = {"kind", "step", "epoch", "lr", "logit_scale", "samples_per_s", "step_s", "data_s"}
    for key in sorted({k for r in train for k in r} - skip):
        points = [(r["step"], r[key]) for r in train if key in r and r[key] > 0]
        if points:
            left.plot(*zip(*points), label=key)
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_title("loss terms (weighted total and unweighted terms)")
    left.legend(fontsize=7, ncol=2)
    if evals:
        last = evals[-1]
        names = [k for k in last if k not in ("kind", "step", "epoch")]
        right.bar(range(len(names)), [last[k] for k in names])
        right.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        right.set_ylim(0, 1)
        right.set_title(f"evaluation at step {last['step']}")
    else:
        right.set_axis_off()
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)
    return out_file
