"""Model versions in the MLflow registry: register a saved model folder as a version (pyfunc flavour +
alias), read a version's recorded metrics, and promote aliases by a metric.

A version's evaluation metrics are stored as version tags `metric.<name>` (plus `eval_split`), so promotion
compares numbers fixed at registration time, whatever happens to the run later.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from mumic_core import checkpoint
from mumic_core.model_config import ModelError

from .. import storage
from . import tracking
from .references import MODEL_FOLDER, alias_version, get_version

log = logging.getLogger(__name__)

METRIC_TAG = "metric."
EVAL_SPLIT_TAG = "eval_split"
PYFUNC_NAME = "model"


def _stage(model_dir: str, parent: str) -> str:
    """A local copy of a (local or s3://) model folder named MODEL_FOLDER, as the pyfunc artifact."""
    staged = os.path.join(parent, MODEL_FOLDER)
    os.makedirs(staged)
    for fname in (checkpoint.WEIGHTS, checkpoint.CONFIG):
        with open(os.path.join(staged, fname), "wb") as f:
            f.write(storage.read_bytes(storage.join(model_dir, fname)))
    return staged


def log_model_version(
    model_dir: str,
    name: str,
    run_id: str,
    *,
    tracking_uri: str | None = None,
    alias: str | None = "candidate",
    metrics: Mapping[str, float] | None = None,
    eval_split: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log `model_dir` as the run's pyfunc model, register it under `name`, point `alias` at it.

    Idempotent per (name, run): if the run already registered a version (e.g. a driver that re-ran after
    a crash), that version is returned and nothing is registered twice. Returns the version number.
    """
    import mlflow  # MLflow's fluent API and pyfunc flavour: imported only when a model is logged

    from . import pyfunc  # (it subclasses mlflow's PythonModel)

    uri = tracking_uri or tracking.tracking_uri()
    c = tracking.client(uri)
    existing = c.search_model_versions(
        f"name = {tracking.filter_value(name, 'model name')} and run_id = {tracking.filter_value(run_id, 'run id')}"
    )
    if existing:
        version = str(max(int(v.version) for v in existing))
        log.info("run %s already registered %s version %s", run_id, name, version)
    else:
        version_tags = {
            f"{METRIC_TAG}{k}": repr(float(v)) for k, v in (metrics or {}).items() if _is_number(v)
        }
        if eval_split:
            version_tags[EVAL_SPLIT_TAG] = eval_split
        version_tags.update(tags or {})
        with tempfile.TemporaryDirectory(prefix="mumic-register-") as tmp, tracking.fluent(uri):
            staged = _stage(model_dir, tmp)
            cfg = checkpoint.read_config(staged)
            with mlflow.start_run(run_id=run_id, log_system_metrics=False), warnings.catch_warnings():
                # the input is a DataFrame of uris or bytes (see pyfunc.signature): no type hints, no example
                warnings.filterwarnings("ignore", message=".*(type hint|input example|input_example).*")
                info = mlflow.pyfunc.log_model(
                    name=PYFUNC_NAME,
                    python_model=pyfunc.CODE_FILE,
                    artifacts={pyfunc.MODEL_DIR_KEY: staged},
                    pip_requirements=pyfunc.pip_requirements(),
                    signature=pyfunc.signature(),
                    metadata={
                        "mumic": {
                            "taxonomy_sha256": cfg.get("taxonomy_sha256"),
                            "backbone": cfg["model"].get("backbone"),
                            "weights_sha256": cfg.get("weights_sha256"),
                        }
                    },
                )
            mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
        version = str(mv.version)
        log.info("registered %s version %s", name, version)
    if alias:
        set_alias(name, alias, version, tracking_uri=uri)
    return version


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def set_alias(name: str, alias: str, version: str, tracking_uri: str | None = None) -> None:
    tracking.client(tracking_uri or tracking.tracking_uri()).set_registered_model_alias(
        name, alias, str(version)
    )


def version_metric(name: str, version: str, metric: str, tracking_uri: str | None = None) -> float:
    """The metric recorded for a version: its `metric.<name>` tag, else the source run's metric
    (`<name>`, `test_<name>` or `val_<name>`). ModelError when the version has none."""
    uri = tracking_uri or tracking.tracking_uri()
    mv = get_version(name, version=str(version), tracking_uri=uri)
    tag = (mv.tags or {}).get(f"{METRIC_TAG}{metric}")
    if tag is not None:
        return float(tag)
    run_metrics = {}
    if mv.run_id:
        run_metrics = tracking.client(uri).get_run(mv.run_id).data.metrics
        for key in (metric, f"test_{metric}", f"val_{metric}"):
            if key in run_metrics:
                return float(run_metrics[key])
    known = sorted(k.removeprefix(METRIC_TAG) for k in (mv.tags or {}) if k.startswith(METRIC_TAG))
    raise ModelError(
        f"{name} version {version} has no metric {metric!r} (recorded: {', '.join(known) or 'none'})"
    )


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    name: str
    alias: str
    version: str
    metric: str
    value: float
    previous_version: str | None
    previous_value: float | None
    message: str


def promote(
    name: str,
    version: str,
    alias: str = "champion",
    metric: str = "gap_at_10",
    force: bool = False,
    tracking_uri: str | None = None,
) -> Promotion:
    """Point `alias` at `version` if it is at least as good as the alias's current holder on `metric`
    (higher is better; every mumic metric is). `force` skips the comparison. A refusal changes nothing
    and says both numbers."""
    uri = tracking_uri or tracking.tracking_uri()
    version = str(version)
    value = version_metric(name, version, metric, uri)
    current = alias_version(name, alias, uri)
    current_value = None
    if current is not None and current != version:
        try:
            current_value = version_metric(name, current, metric, uri)
        except ModelError:
            current_value = None  # the holder was never measured on this metric: nothing to defend
    ok = (
        force
        or current is None
        or current == version
        or current_value is None
        or (not math.isnan(value) and value >= current_value)
    )
    if not ok:
        message = (
            f"refused: {name} version {version} has {metric} {value:.4f} < {current_value:.4f} of version "
            f"{current} (alias {alias!r}); use --force to override"
        )
        return Promotion(False, name, alias, version, metric, value, current, current_value, message)
    set_alias(name, alias, version, uri)
    if current is None:
        why = "no previous holder"
    elif current == version:
        why = "already the holder"
    elif current_value is None:
        why = f"version {current} has no {metric}"
    else:
        why = f"version {current} had {current_value:.4f}" + (
            " (forced)" if force and value < current_value else ""
        )
    message = f"promoted: {name} version {version} is now {alias!r} ({metric} {value:.4f}; {why})"
    return Promotion(True, name, alias, version, metric, value, current, current_value, message)
