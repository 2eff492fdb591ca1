"""`run_drift`: compare two committed runs of an output location, write the comparison into the `drift`
table and an HTML report, and return it (summary, one row per label, warnings)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from .. import storage
from ..progress import Progress
from .report import html_page
from .sides import SCOPES, DriftError, Side, batches, current_versions, pick_runs
from .stats import centroid_shift, label_rows
from .table import drift_uri, write_comparison
from .tally import Tally, taxonomies
from .thresholds import Thresholds


@dataclass
class Drift:
    summary: dict  # the comparison: runs, dates, rows, models, centroid shift, settings, flagged count
    labels: list[dict]  # one per label (the drift table's per-label columns)
    warnings: list[str] = field(default_factory=list)
    table: str = ""  # where the rows went
    report: str = ""  # the HTML page


def report_uri(output: str, from_id: str, to_id: str, scope: str) -> str:
    suffix = "" if scope == "current" else f"-{scope}"
    return storage.join(output, "reports", f"drift-{from_id}-{to_id}{suffix}.html")


def run_drift(
    output: str,
    from_run: str | None = None,
    to_run: str | None = None,
    scope: str = "current",
    models: list[str] | tuple[str, ...] = (),
    tracking_uri: str | None = None,
    workdir: str | None = None,
    fallback_threshold: float = 0.5,
    alpha: float = 0.01,
    min_change: float = 0.02,
    report: str | None = None,
    progress: bool = True,
) -> Drift:
    """Compare run `from_run` (default: the run before `to_run`) with `to_run` (default: the latest)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    say = Progress("drift", enabled=progress)
    output = storage.normalize(output)
    frm, to, runs = pick_runs(output, from_run, to_run)
    versions = current_versions(output, [frm["run_id"], to["run_id"]], say) if scope == "current" else {}
    sides = [Side(r, scope, versions.get(r["run_id"])) for r in (frm, to)]
    thresholds = Thresholds(list(models), tracking_uri, workdir, fallback_threshold)
    names = taxonomies(runs)
    tallies = []
    for side in sides:
        say(f"reading {side.describe()}")
        tally = Tally()
        for batch in batches(output, side):
            tally.add(batch, names, thresholds)
            say.every(10, f"{side.run_id}: {tally.rows} rows read", key=side.run_id)
        tallies.append(tally)
    a, b = tallies
    if not a.rows and not b.rows:
        raise DriftError(f"neither run {frm['run_id']} nor run {to['run_id']} has rows with scores in scope {scope}")
    labels = label_rows(a, b, alpha, min_change)
    centroid_model = (to["model_name"], to["model_version"])
    shift, note = centroid_shift(a, b, centroid_model)
    summary = _summary(sides, tallies, labels, scope, alpha, min_change, shift, note, centroid_model)
    warnings = [*dict.fromkeys(thresholds.warnings)]
    warnings += [f"--model {ref} made none of the rows compared: its thresholds were not used"
                 for ref in thresholds.unused_refs(set(a.models) | set(b.models))]
    warnings += [f"run {s.run_id} has no rows in scope {scope} (an incremental run that skipped every image "
                 "has none of its own: --scope current compares the catalog as each run left it)"
                 for s, t in zip(sides, tallies, strict=True) if not t.rows]
    stamp = dt.datetime.now(dt.UTC)
    rows = [{**summary, **r, "computed_at": stamp} for r in labels]
    say(f"writing {len(rows)} rows into {storage.redact(drift_uri(output))}")
    write_comparison(output, rows)
    where = storage.normalize(report) if report else report_uri(output, frm["run_id"], to["run_id"], scope)
    storage.write_bytes(where, html_page(summary, labels, warnings).encode("utf-8"))
    return Drift(summary, labels, warnings, table=drift_uri(output), report=where)


def _summary(sides, tallies, labels, scope, alpha, min_change, shift, note, centroid_model) -> dict:
    a, b = tallies
    return {
        "from_run_id": sides[0].run_id,
        "to_run_id": sides[1].run_id,
        "scope": scope,
        "from_run_date": sides[0].run["run_date"],
        "to_run_date": sides[1].run["run_date"],
        "rows_from": a.rows,
        "rows_to": b.rows,
        "models_from": _models(a),
        "models_to": _models(b),
        "centroid_model": f"{centroid_model[0]}/{centroid_model[1]}",
        "centroid_shift": shift,
        "centroid_note": note,
        "alpha": alpha,
        "min_change": min_change,
        "labels": len(labels),
        "flagged": sum(r["flagged"] for r in labels),
    }


def _models(tally: Tally) -> str:
    """`name/version` of the side's models, most rows first ("" when the side has no rows)."""
    return ", ".join(f"{n}/{v}" for (n, v), _ in tally.models.most_common())
