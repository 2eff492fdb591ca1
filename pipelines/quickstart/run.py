"""The whole loop on one machine, no services, no network: generate a labelled catalog, train the tiny
model with Ray Train (2 workers), register and promote it in MLflow (sqlite), re-tag the catalog into
Delta tables, and write an HTML report."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mumic_core import synthetic
from mumic_core.metrics import HEADLINE

from .. import storage
from ..progress import Progress
from ..registry import promote, tracking
from ..retag import run_retag
from ..tables import latest_run
from ..train import TrainConfig, train
from . import report


@dataclass
class QuickstartOptions:
    images: int = 2400
    epochs: int = 5
    workers: int = 2
    batch_size: int = 64
    seed: int = 0
    model_name: str = "mumic-quickstart"
    experiment: str = "mumic-quickstart"
    lr_image: float = 2e-3
    lr_text: float = 2e-3
    extra: dict = field(default_factory=dict)


say = Progress("quickstart")


def make_data(workdir: Path, n: int, seed: int) -> dict[str, str]:
    """Generated images with known labels, an annotations file, a catalog and a taxonomy."""
    data = workdir / "data"
    rows = synthetic.write_dataset(data, n, seed=seed)
    ann = pa.table(
        {
            "image_id": [r["image_id"] for r in rows],
            "uri": [r["uri"] for r in rows],
            "labels": pa.array([r["labels"] for r in rows], pa.list_(pa.string())),
            "split": [r["split"] for r in rows],
        }
    )
    pq.write_table(ann, data / "annotations.parquet")
    pq.write_table(ann.select(["image_id", "uri"]), data / "catalog.parquet")
    (data / "taxonomy.yaml").write_text(yaml.safe_dump(synthetic.taxonomy().to_dict(), sort_keys=False))
    return {
        "annotations": str(data / "annotations.parquet"),
        "catalog": str(data / "catalog.parquet"),
        "taxonomy": str(data / "taxonomy.yaml"),
    }


def run_quickstart(workdir: str | Path, opts: QuickstartOptions | None = None) -> dict:
    opts = opts or QuickstartOptions()
    t0 = time.perf_counter()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.tracking_uri(str(workdir))

    say(f"1/5 generating {opts.images} labelled images in {workdir / 'data'}")
    paths = make_data(workdir, opts.images, opts.seed)
    say(f"2/5 training {opts.model_name} (mumic-tiny) with Ray Train, {opts.workers} workers, {opts.epochs} epochs")
    result = _train(opts, paths, workdir, uri)
    version = str(result.model_version)
    say(f"3/5 promoting {opts.model_name} version {version} to 'champion'")
    say(promote(opts.model_name, version, alias="champion", tracking_uri=uri).message)
    output = workdir / "output"
    model_ref = f"models:/{opts.model_name}@champion"
    say(f"4/5 re-tagging the catalog with {model_ref} into {output}")
    summary = _retag(paths["catalog"], model_ref, output, uri)
    say("5/5 writing the report")
    next_steps = _next_steps(workdir, output, model_ref, uri)
    test_metrics = result.test.metrics if result.test else {}
    html_path = _write_report(workdir, opts, result, version, summary, output, uri, next_steps, t0)
    return {
        "workdir": str(workdir),
        "paths": paths,
        "tracking_uri": storage.redact(uri),  # shown to the user: credentials masked
        "model_name": opts.model_name,
        "model_version": version,
        "model_ref": model_ref,
        "output": str(output),
        "report": str(html_path),
        "retag": summary,
        "test_metrics": {k: v for k, v in test_metrics.items() if not k.startswith("baseline_")},
        "next_steps": next_steps,
        "seconds": time.perf_counter() - t0,
    }


def _train(opts: QuickstartOptions, paths: dict[str, str], workdir: Path, uri: str):
    return train(
        TrainConfig(
            annotations=paths["annotations"],
            taxonomy=paths["taxonomy"],
            backbone="mumic-tiny",
            workers=opts.workers,
            epochs=opts.epochs,
            batch_size=opts.batch_size,
            lr_image=opts.lr_image,
            lr_text=opts.lr_text,
            experiment=opts.experiment,
            register=opts.model_name,
            workdir=str(workdir),
            tracking_uri=uri,
            seed=opts.seed,
            **opts.extra,
        )
    )


def _retag(catalog: str, model_ref: str, output: Path, uri: str) -> dict:
    prev = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the retag job resolves models:/ through it
    try:
        return run_retag(catalog, model_ref, str(output))
    finally:
        if prev is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev


def _next_steps(workdir: Path, output: Path, model_ref: str, uri: str) -> list[str]:
    image = workdir / "data" / "images" / "img-0-000000.jpg"
    return [
        f"mumic runs --output {output}",
        f"mumic search --output {output} --model {model_ref} --text 'red'",
        f"mumic tag {image} --model {model_ref}",
        f"mumic tag {image} --model {model_ref} --labels 'blue,red,a cat'",
        "",
        "The latest committed run's row count in DuckDB (docs/output-tables.md has more queries):",
        "python - <<'EOF'",
        "import duckdb, polars as pl  # Polars' reader: the process exits cleanly (output-tables.md)",
        f"tags = pl.scan_delta('{output / 'tags'}')",
        f"runs = pl.scan_delta('{output / 'runs'}')",
        'print(duckdb.sql("SELECT run_id, count(*) AS rows FROM tags WHERE run_id = '
        "(SELECT run_id FROM runs ORDER BY finished_at DESC LIMIT 1) GROUP BY run_id\").fetchall())",
        "EOF",
        "",
        f"MLflow UI: mlflow ui --backend-store-uri {storage.redact(uri)}",
    ]


def _charts(uri: str, run_id: str, workdir: Path) -> list[tuple[str, Path]]:
    """The training run's per-class AP and PR-curve PNGs, downloaded from MLflow."""
    charts = []
    try:
        local = tracking.client(uri).download_artifacts(run_id, "evaluation", str(workdir / "report_assets"))
        for name, caption in (
            ("per_class_ap.png", "Per-class AP (validation)"),
            ("pr_curves.png", "Precision-recall curves"),
        ):
            if (Path(local) / name).exists():
                charts.append((caption, Path(local) / name))
    except Exception as e:  # the report is a convenience: say what is missing, keep going
        say(f"charts unavailable: {storage.redact(str(e)).splitlines()[0]}")
    return charts


def _write_report(workdir, opts, result, version, summary, output, uri, next_steps, t0) -> Path:
    run = latest_run(str(output))
    sheet = report.contact_sheet(report.sample_tagged(str(output), run, 24)) if run else None
    if sheet is not None:
        sheet.save(workdir / "contact_sheet.png")
    test_metrics = result.test.metrics if result.test else {}
    shown = {k: float(test_metrics[k]) for k in (*HEADLINE, "baseline_map") if k in test_metrics}
    rows = f"{summary.get('rows_ok')} / {summary.get('rows_error')} / {summary.get('rows_skipped')}"
    summary_rows = {
        "model": f"{opts.model_name} version {version} (alias champion)",
        "training": f"{result.epochs} epochs, best epoch {result.best_epoch}, {result.seconds:.0f} s, "
        f"{result.samples_per_s:.0f} samples/s",
        "retag run": summary.get("run_id"),
        "rows ok / error / skipped": rows,
        "retag images/s": f"{summary.get('images_per_s', 0):.1f}",
        "tables": str(output),
        "MLflow": storage.redact(uri),
        "total time": f"{time.perf_counter() - t0:.0f} s",
    }
    return report.write_html(
        workdir / "report.html",
        "mumic quickstart",
        summary_rows,
        metrics=shown,
        charts=_charts(uri, result.run_id, workdir),
        sheet=sheet,
        next_steps=next_steps,
    )
