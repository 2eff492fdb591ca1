"""The MLflow model registry: register a saved model folder as a model version (pyfunc flavour + alias),
resolve `models:/NAME@ALIAS` and `models:/NAME/VERSION` to a model folder, and promote aliases by a metric.

A version's evaluation metrics are stored as version tags `metric.<name>` (plus `eval_split`), so promotion
compares numbers fixed at registration time, whatever happens to the run later.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from mumic_core import checkpoint
from mumic_core.model import ModelError

from . import storage, tracking
from .models import ModelRef

log = logging.getLogger(__name__)

METRIC_TAG = "metric."
EVAL_SPLIT_TAG = "eval_split"
MODEL_FOLDER = "mumic_model"  # name of the saved model folder inside the pyfunc's artifacts
PYFUNC_NAME = "model"
_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` → (NAME, ALIAS, None); `models:/NAME/VERSION` → (NAME, None, VERSION)."""
    m = _REF.match(str(ref).strip())
    if not m:
        raise ModelError(f"bad model reference {ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    version = m.group("version")
    if version is not None and not (version.isdigit() or version == "latest"):
        raise ModelError(f"bad model reference {ref!r}: VERSION must be a number (or 'latest')")
    return m.group("name"), m.group("alias"), version


def _where(uri: str) -> str:
    return storage.redact(uri)


def _mlflow_error():
    from mlflow.exceptions import MlflowException

    return MlflowException


def get_version(
    name: str, alias: str | None = None, version: str | None = None, tracking_uri: str | None = None
):
    """The registry's ModelVersion for an alias or a version number; ModelError when there is none."""
    uri = tracking_uri or tracking.tracking_uri()
    c = tracking.client(uri)
    try:
        if alias is not None:
            return c.get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = c.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelError(f"no versions of model {name!r} in the registry at {_where(uri)}")
            return max(versions, key=lambda v: int(v.version))
        return c.get_model_version(name, str(version))
    except _mlflow_error() as e:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise ModelError(
            f"model {name!r} has no {what} in the registry at {_where(uri)} ({e.error_code})"
        ) from None


def alias_version(name: str, alias: str, tracking_uri: str | None = None) -> str | None:
    """The version an alias points at, or None when the model or the alias does not exist."""
    try:
        return str(get_version(name, alias=alias, tracking_uri=tracking_uri).version)
    except ModelError:
        return None


def resolve(ref: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> ModelRef:
    """A registry reference → the model folder of that version (+ name and version for the tables).

    Artifacts on a filesystem or S3 are used where they are (retag actors on any node read s3:// directly);
    artifacts behind a tracking server (mlflow-artifacts:/) are downloaded once into a local cache.
    """
    uri = tracking_uri or tracking.tracking_uri()
    name, alias, version = parse_ref(ref)
    mv = get_version(name, alias=alias, version=version, tracking_uri=uri)
    c = tracking.client(uri)
    download_uri = c.get_model_version_download_uri(name, str(mv.version))
    folder = f"{download_uri.rstrip('/')}/artifacts/{MODEL_FOLDER}"
    if folder.startswith(("file:", "/", "s3://")):
        try:
            checkpoint.read_config(storage.normalize(folder))
            return ModelRef(ref=ref, uri=storage.normalize(folder), name=name, version=str(mv.version))
        except (ModelError, OSError):
            pass  # not where we expect it (an older layout?): download below
    return ModelRef(
        ref=ref,
        uri=_download(uri, name, str(mv.version), folder, cache_dir),
        name=name,
        version=str(mv.version),
    )


def _download(uri: str, name: str, version: str, artifact_uri: str, cache_dir: str | None) -> str:
    """Download a version's model folder once; versions are immutable, so a complete copy is reused."""
    import mlflow

    root = cache_dir or os.environ.get("MUMIC_CACHE_DIR") or os.path.expanduser("~/.cache/mumic/models")
    key = hashlib.sha256(uri.encode()).hexdigest()[:12]
    target = os.path.join(root, key, name, version)
    if os.path.exists(os.path.join(target, checkpoint.CONFIG)):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(target))
    try:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=uri
            )
        except _mlflow_error() as e:
            raise ModelError(f"cannot download model {name}/{version}: {str(e).splitlines()[0]}") from None
        checkpoint.read_config(local)  # complete, or raise
        try:
            os.replace(local, target)
        except OSError:  # another process finished first: theirs is as good
            if not os.path.exists(os.path.join(target, checkpoint.CONFIG)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    import mlflow

    from . import pyfunc

    uri = tracking_uri or tracking.tracking_uri()
    c = tracking.client(uri)
    existing = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
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
