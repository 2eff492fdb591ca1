"""`mumic quickstart`: the whole loop on this machine, with no services to start and no network."""

from __future__ import annotations

import argparse

NAME = "quickstart"
HELP = "generate a labelled catalog, train, register, promote, re-tag and report, all locally"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="where data, MLflow (sqlite), tables and the report go")
    p.add_argument("--images", type=int, default=2400, help="how many generated images (default 2400)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from jobs.cli import UserError
    from pipelines.quickstart import QuickstartOptions, run_quickstart

    if args.images < 100:
        raise UserError("--images must be at least 100 (train, val and test splits need examples)", 2)
    out = run_quickstart(
        args.workdir,
        QuickstartOptions(images=args.images, epochs=args.epochs, workers=args.workers, seed=args.seed),
    )
    r = out["retag"]
    m = out["test_metrics"]
    print()
    print(f"Done in {out['seconds']:.0f} s.")
    print(f"  model      {out['model_ref']}  (= {out['model_name']} version {out['model_version']})")
    if m:
        print(f"  test       mAP {m.get('map', float('nan')):.3f}  GAP@10 {m.get('gap_at_10', float('nan')):.3f}  "
              f"F1@3 {m.get('f1_at_3', float('nan')):.3f}")
    print(f"  tables     {out['output']}/tags and {out['output']}/runs  "
          f"(run {r.get('run_id')}: {r.get('rows_ok')} ok, {r.get('rows_error')} error, {r.get('rows_skipped')} skipped)")
    print(f"  MLflow     {out['tracking_uri']}")
    print(f"  report     {out['report']}")
    print()
    print("Try next (set MLFLOW_TRACKING_URI so models:/ references resolve):")
    print(f"  export MLFLOW_TRACKING_URI={out['tracking_uri']}")
    for line in out["next_steps"]:
        print(f"  {line}" if line else "")
    return 0
