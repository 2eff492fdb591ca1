"""`mumic ablate`: train and evaluate a grid (heads x losses x train modes x seeds x inits) on the same data
and splits, beside zero-shot and linear-probe baselines; one MLflow parent run, one comparison table."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pydantic.dataclasses import dataclass

from jobs.errors import UserError
from jobs.options import json_field

if TYPE_CHECKING:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.ablation import AblationConfig

NAME = "ablate"
HELP = "train and evaluate a grid of heads, losses, train modes, seeds and inits; one comparison table"
DESCRIPTION = (
    "Run every cell of a grid (axes head, loss, train_mode, seed, init) as a `mumic train` on the same "
    "annotations and splits (Ray Train, the base options' workers), plus baselines per seed: zero-shot scores "
    "of the untrained starting model and a linear probe on its frozen image embeddings. Loss presets: "
    "plain_bce, tempered_learned, tempered_fixed, focal, asl. init: base, warm (the first model trains on a "
    "share of train, the warm-started one on all of it) or a model reference. Each run is a child of one "
    "MLflow parent run; OUTPUT/results.csv and results.md are rewritten after every run, and the same command "
    "again skips the runs already there (same config hash). Usually given as --config FILE "
    "(jobs/configs/ablation_*.yaml)."
)
GROUPS = {
    "data": ("annotations", "taxonomy", "generate", "unseen"),
    "grid": ("base", "grid", "loss_presets", "baselines", "warm_start"),
    "run": ("output", "name", "experiment", "workdir", "max_runs", "json"),
}


@dataclass(frozen=True)
class AblateOutput:
    json: bool = json_field("the results rows")


def options() -> tuple[type, ...]:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.ablation.options import AblationConfig

    return (AblationConfig, AblateOutput)


def run(cfg: AblationConfig, out: AblateOutput) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.registry.tracking import quiet_mlflow

    quiet_mlflow()
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.ablation import AblationError, run_ablation
    from pipelines.annotations import AnnotationError
    from pipelines.train import TrainError

    try:
        result = run_ablation(cfg)
    except (AblationError, AnnotationError, TrainError) as e:
        raise UserError(str(e)) from None
    if out.json:
        summary = {k: getattr(result, k) for k in ("complete", "executed", "csv", "markdown", "mlflow_run_id")}
        print(json.dumps({**summary, "rows": result.rows}, indent=2, default=str))
        return 0
    with open(result.markdown) as f:
        print(f.read(), end="")
    state = "complete" if result.complete else "not complete: run the same command again to continue"
    print(f"{len(result.rows)} runs in {result.csv} ({state}); MLflow parent run {result.mlflow_run_id}")
    return 0
