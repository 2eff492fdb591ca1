"""`mumic review`, composed: resolve the model, read what it tagged in `current`, pick the queue, write the
CSV and the contact sheet beside it."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence

import numpy as np

from mumic_core import checkpoint
from mumic_core.taxonomy import Taxonomy

from .. import storage
from ..progress import Progress
from ..registry.references import resolve_model
from .queue import queue_table, read_candidates, write_csv
from .select import margins, review_queue
from .sheet import contact_sheet


class ReviewError(ValueError):
    """A user-fixable problem with a review (one line): unknown labels, nothing tagged by the model."""


def label_columns(names: Sequence[str], labels: Sequence[str] | None) -> list[int]:
    """The taxonomy columns the queue spreads over: all of them, or the named labels (all must exist)."""
    if not labels:
        return list(range(len(names)))
    index = {n: i for i, n in enumerate(names)}
    unknown = [lb for lb in labels if lb not in index]
    if unknown:
        shown = ", ".join(repr(u[:60]) for u in unknown[:10])
        raise ReviewError(f"--labels: not in the model's taxonomy: {shown} (it has {len(names)} labels, e.g. "
                          f"{', '.join(names[:5])})")
    return [index[lb] for lb in dict.fromkeys(labels)]


def default_csv(output: str, now: dt.datetime | None = None) -> str:
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return storage.join(output, "review", f"queue-{stamp}.csv")


def sheet_uri(csv_uri: str) -> str:
    """The contact sheet beside the CSV: the same name, `.html`."""
    stem = csv_uri[: -len(".csv")] if csv_uri.lower().endswith(".csv") else csv_uri
    return stem + ".html"


def run_review(
    output: str,
    model: str,
    k: int,
    labels: Sequence[str] | None = None,
    out: str | None = None,
    sheet: bool = True,
    progress: bool = True,
) -> dict:
    """Write the k-image review queue of `model` over `current` in `output`; returns what was written."""
    say = Progress("review", progress)
    mref = resolve_model(model)
    cfg = checkpoint.read_config(mref.uri)  # names and thresholds only: the weights are not needed
    names = Taxonomy.from_dict(cfg["taxonomy"]).names
    thresholds = np.asarray(cfg["thresholds"], dtype=np.float32)
    columns = label_columns(names, labels)
    say(f"reading {storage.redact(storage.join(output, 'current'))} for images tagged by {mref.name}/{mref.version}")
    cands = read_candidates(
        output, (mref.name, mref.version), thresholds, k, columns,
        on_batch=lambda n: say.every(5, f"{n} rows read", key="read"),
    )
    if cands.rows == 0:
        raise ReviewError(
            f"no images of current in {storage.redact(output)} were tagged by {mref.name}/{mref.version} "
            f"({cands.rows_other_model} by other models): retag them with it first (mumic retag --model {storage.redact(model)})"
        )
    picks = review_queue(margins(cands.scores, thresholds), cands.image_ids, k, columns)
    table = queue_table(cands, picks, names, thresholds)
    csv_uri = storage.normalize(out) if out else default_csv(output)
    write_csv(table, csv_uri)
    say(f"{len(picks)} of {cands.rows} images queued: {storage.redact(csv_uri)}")
    summary = {
        "csv": csv_uri,
        "sheet": None,
        "queued": len(picks),
        "rows": cands.rows,
        "rows_other_model": cands.rows_other_model,
        "model": f"{mref.name}/{mref.version}",
        "per_label": dict(Counter(names[p.column] for p in picks).most_common()),
    }
    if sheet:
        summary["sheet"] = sheet_uri(csv_uri)
        intro = (f"{len(picks)} images of {cands.rows} tagged by {mref.name}/{mref.version}, least sure first. "
                 f"Correct the labels column of {storage.redact(csv_uri)}, then train on it (mumic train --annotations).")
        summary["unshown"] = contact_sheet(
            table.to_pylist(), summary["sheet"], f"review queue: {mref.name}/{mref.version}", intro,
            on_read=lambda n: say.every(5, f"contact sheet: {n}/{len(picks)} pictures", key="sheet"),
        )
        say(f"contact sheet: {storage.redact(summary['sheet'])}")
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"queued {summary['queued']} of {summary['rows']} images tagged by {summary['model']}",
        f"csv:   {storage.redact(summary['csv'])}",
    ]
    if summary["sheet"]:
        lines.append(f"sheet: {storage.redact(summary['sheet'])}")
    if summary["rows_other_model"]:
        lines.append(f"({summary['rows_other_model']} images tagged by other models were left out)")
    if summary.get("unshown"):
        lines.append(f"({summary['unshown']} pictures could not be shown in the sheet; their rows are in the csv)")
    top = ", ".join(f"{label} {n}" for label, n in list(summary["per_label"].items())[:10])
    lines.append(f"by label: {top}" + (" ..." if len(summary["per_label"]) > 10 else ""))
    return "\n".join(lines)
