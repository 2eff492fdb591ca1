"""`mumic quickstart`: the whole loop on this machine, with no services to start and no network."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass

NAME = "quickstart"
HELP = "generate a labelled catalog, train, register, promote, re-tag and report, all locally"


@dataclass(frozen=True)
class QuickstartArgs:
    workdir: str = Field(description="where data, MLflow (sqlite), tables and the report go")
    images: int = Field(2400, description="how many generated images (at least 100)")
    epochs: int = Field(5, ge=1, description="training epochs")
    workers: int = Field(2, ge=1, description="Ray Train workers")
    seed: int = Field(0, description="seed of the generated data and of training")

    @field_validator("images")
    @classmethod
    def _enough_images(cls, value: int) -> int:
        if value < 100:
            raise ValueError("must be at least 100 (train, val and test splits need examples)")
        return value


def options() -> tuple[type, ...]:
    return (QuickstartArgs,)


def run(args: QuickstartArgs) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.quickstart import QuickstartOptions, run_quickstart

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
