"""An ablation's results: one CSV row per run, rewritten after every run (what resume reads), and the
comparison table in Markdown, rows grouped over seeds (mean ± std)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..evaluation import OPEN_VOCABULARY, Report
from .plan import Step

SPLIT_METRICS = ("map", "gap_at_10", "f1_at_3", "f1_at_5")
METRICS = tuple(f"val_{k}" for k in SPLIT_METRICS) + tuple(f"test_{k}" for k in (*SPLIT_METRICS, *OPEN_VOCABULARY))
COLUMNS = ("run", "kind", "head", "loss", "train_mode", "seed", "init", "config_hash", *METRICS,
           "best_epoch", "epochs", "seconds", "mlflow_run_id", "model_dir")
KIND_SHOWN = {
    "zero_shot": "zero-shot, untrained start",
    "linear_probe": "linear probe, frozen start",
    "warm_source": "warm-start source (earlier annotations)",
    "train": "trained",
}
# (title, column) of the Markdown table's metric columns; the ZSL/GZSL ones only with unseen labels
SHOWN = (("val mAP", "val_map"), ("test mAP", "test_map"), ("test F1@3", "test_f1_at_3"))
SHOWN_OPEN = (("ZSL mAP", "test_zsl_map"), ("ZSL F1@3", "test_zsl_f1_at_3"), ("GZSL mAP", "test_gzsl_map"))


def row(step: Step, reports: dict[str, Report], seconds: float, **extra: Any) -> dict[str, Any]:
    """A results row: the step's coordinates, its val and test metrics (NaN when absent), and `extra`."""
    out: dict[str, Any] = {
        "run": step.name, "kind": step.kind, "head": step.cell.head, "loss": step.cell.loss,
        "train_mode": step.cell.train_mode, "seed": step.cell.seed, "init": step.cell.init,
        "config_hash": step.config_hash,
    }
    for column in METRICS:
        split, key = column.split("_", 1)
        out[column] = float(reports[split].metrics.get(key, math.nan)) if split in reports else math.nan
    out.update({"best_epoch": None, "epochs": None, "mlflow_run_id": None, "model_dir": None, **extra})
    out["seconds"] = round(float(seconds), 1)
    return out


class Results:
    """results.csv + results.md in a folder; rows keyed by config hash (a changed run is a new row)."""

    def __init__(self, folder: Path, steps: Sequence[Step]):
        self.csv, self.markdown = folder / "results.csv", folder / "results.md"
        self.steps = list(steps)
        self._rows: dict[str, dict[str, Any]] = {}
        if self.csv.exists():
            frame = pd.read_csv(self.csv, dtype={"config_hash": str, "mlflow_run_id": str})
            for record in frame.to_dict("records"):
                self._rows[str(record["config_hash"])] = {
                    k: (None if isinstance(v, float) and math.isnan(v) and k not in METRICS else v)
                    for k, v in record.items()
                }

    def get(self, step: Step) -> dict[str, Any] | None:
        return self._rows.get(step.config_hash)

    def add(self, new: dict[str, Any]) -> None:
        self._rows[new["config_hash"]] = new
        self.write()

    @property
    def current(self) -> list[dict[str, Any]]:
        """The rows of this plan's steps that are done, in plan order."""
        return [self._rows[s.config_hash] for s in self.steps if s.config_hash in self._rows]

    def best(self) -> dict[str, Any] | None:
        scored = [r for r in self.current if _finite(r.get("val_map"))]
        return max(scored, key=lambda r: r["val_map"]) if scored else None

    def write(self) -> None:
        """Both files, each replaced whole: an interrupted write leaves the previous version."""
        planned = {s.config_hash for s in self.steps}
        others = [r for h, r in self._rows.items() if h not in planned]  # earlier plans' rows are kept
        frame = pd.DataFrame(self.current + others, columns=list(COLUMNS))
        _replace(self.csv, frame.to_csv(index=False))
        _replace(self.markdown, markdown(self.current))


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table: one line per run kind and cell over its seeds (mean ± std when several)."""
    open_vocab = any(_finite(r.get("test_zsl_map")) for r in rows)
    shown = SHOWN + (SHOWN_OPEN if open_vocab else ())
    head = ["run", "head", "loss", "train_mode", "init", "seeds", *[t for t, _ in shown], "s per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 5 + "---:|" * (len(head) - 5)]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["head"], r["loss"], r["train_mode"], r["init"]), []).append(r)
    for (kind, head_name, loss, mode, init), members in groups.items():
        seeds = ",".join(str(int(r["seed"])) for r in members)
        cells = [_mean_std([r.get(column) for r in members]) for _, column in shown]
        seconds = _mean_std([r.get("seconds") for r in members], digits=0, spread=False)
        loss_shown = "-" if kind in ("zero_shot", "linear_probe") else loss
        mode_shown = "-" if kind in ("zero_shot", "linear_probe") else mode
        lines.append("| " + " | ".join([KIND_SHOWN.get(kind, kind), head_name, loss_shown, mode_shown, init, seeds,
                                        *cells, seconds]) + " |")
    return "\n".join(lines) + "\n"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mean_std(values: list[Any], digits: int = 4, spread: bool = True) -> str:
    finite = np.array([float(v) for v in values if _finite(v)])
    if finite.size == 0:
        return "–"
    mean = f"{finite.mean():.{digits}f}"
    if finite.size < 2 or not spread:
        return mean
    return f"{mean} ± {finite.std(ddof=1):.{digits}f}"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
