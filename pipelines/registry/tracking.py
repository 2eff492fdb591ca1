"""MLflow tracking: where runs live, run creation/resumption by name, params, metrics, and the Ray Train
callback that logs each epoch from the driver's node as reports arrive.

The tracking URI comes from MLFLOW_TRACKING_URI, else a sqlite file `mlflow.db` in the workdir. Nothing
here reads or logs environment variables or credentials; string params pass through `storage.redact`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

from .. import storage
from ..progress import Progress

log = logging.getLogger(__name__)

RUN_NAME_TAG = "mumic.run_name"
MAX_PARAM_CHARS = 6000
_METRIC_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")

try:  # the callback base class only matters inside Ray Train; keep this module importable without it
    from ray.train import UserCallback as _RayCallback
except Exception:  # noqa: BLE001 - Ray missing or Train V1: the callback is then never used
    _RayCallback = object  # type: ignore[assignment,misc]


def tracking_uri(workdir: str | None = None) -> str:
    """MLFLOW_TRACKING_URI when set, else sqlite:///<workdir or MUMIC_WORKDIR or cwd>/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    folder = os.path.abspath(workdir or os.environ.get("MUMIC_WORKDIR") or os.getcwd())
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}"


def default_artifact_location(uri: str, workdir: str | None = None) -> str | None:
    """Local stores keep artifacts beside the database (not in ./mlruns of whatever cwd); a tracking
    server decides for itself (None)."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    folder = os.path.abspath(workdir or os.environ.get("MUMIC_WORKDIR") or os.getcwd())
    if uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri.removeprefix("sqlite:///")) or folder
    return os.path.join(folder, "mlartifacts")


def quiet_mlflow() -> None:
    """MLflow logs INFO lines (database migrations, "registered model ...") on stderr; a command keeps
    stderr for its own one-line errors unless --log-level asks for more."""
    level = max(logging.WARNING, logging.getLogger().getEffectiveLevel())
    logging.getLogger("mlflow").setLevel(level)
    logging.getLogger("alembic").setLevel(level)


def mlflow_error() -> type[Exception]:
    from mlflow.exceptions import MlflowException  # MLflow is imported only when a registry is used

    return MlflowException


def client(uri: str | None = None):
    """An MlflowClient of `uri` whose errors never carry credentials (MLflow's say "API request to
    <the whole URI>/api/... failed")."""
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    _no_url_printing(uri)
    return _Scrubbed(MlflowClient(tracking_uri=uri))


class _Scrubbed:
    """A client's methods, with the message of any error they raise redacted (same exception, same type)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                scrub(e)
                raise

        return call


def scrub(e: BaseException | None) -> None:
    """Redact an exception's message in place (`args`, and MLflow's `message`), and its causes'."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        with contextlib.suppress(Exception):  # an exception type with read-only args: leave it
            e.args = tuple(storage.redact(a) if isinstance(a, str) else a for a in e.args)
            if isinstance(getattr(e, "message", None), str):
                e.message = storage.redact(e.message)
        e = e.__cause__ or e.__context__


def _no_url_printing(uri: str) -> None:
    """MLflow prints "View run ... at: <tracking URI>/#/..." on stdout when a run ends on a tracking server,
    credentials included: with a URI that carries any, it is told not to (this process)."""
    if storage.redact(uri) != uri:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def filter_value(value: str, what: str = "value") -> str:
    """`value` as a string literal of MLflow's search filters (`name = <literal>`).

    The grammar has no escapes: a literal is everything between two equal quotes, and a backslash before
    the closing quote escapes it. So a value is quoted with a quote it does not contain (`'`, else `"`);
    one holding both, or ending with a backslash, cannot be searched for and is refused in one line.
    """
    value = str(value)
    if not value.endswith("\\"):
        for quote in ("'", '"'):
            if quote not in value:
                return f"{quote}{value}{quote}"
    from mumic_core.model_config import ModelError  # only on this rare path

    raise ModelError(
        f"{what} {value!r} cannot be searched for in MLflow (it holds both ' and \" or ends with \\); rename it"
    )


@contextlib.contextmanager
def fluent(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, load_model) reads a process-global URI (and set_tracking_uri also
    exports MLFLOW_TRACKING_URI): use `uri` for a block only, then put everything back as it was."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    _no_url_printing(uri)

    # set_tracking_uri / set_registry_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI: restore
    # both, or a later client in this process talks to this block's server.
    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, {k: os.environ.get(k) for k in env_keys})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    except Exception as e:
        scrub(e)
        raise
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri, env = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_experiment(mlflow_client, name: str, artifact_location: str | None = None) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if artifact_location and "://" not in artifact_location:
        os.makedirs(artifact_location, exist_ok=True)
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process: use theirs
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(mlflow_client, experiment_id: str, run_name: str, tags: Mapping[str, str] | None = None):
    """The run tagged with this run name (resumed: status back to RUNNING), else a new one.

    Returns (run_id, resumed). Re-running a training with the same run name thus continues the same
    MLflow run, as Ray Train continues the same checkpoints.
    """
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = {filter_value(run_name, 'run name')}",
        max_results=1,
    )
    if runs:
        run_id = runs[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = mlflow_client.create_run(
        experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})}
    )
    return run.info.run_id, False


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}{sep}", sep))
        else:
            out[key] = v
    return out


def log_params(mlflow_client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log a (nested) config whole; values are redacted. On a resumed run, params already logged keep
    their first value (MLflow refuses changes) and a differing new value is only warned about."""
    from mlflow.entities import Param

    existing = mlflow_client.get_run(run_id).data.params
    batch = []
    for key, value in flatten(params).items():
        text = storage.redact("" if value is None else str(value))[:MAX_PARAM_CHARS]
        if key in existing:
            if existing[key] != text:
                log.warning(
                    "param %s was %r when the run started; keeping it (now %r)", key, existing[key], text
                )
            continue
        batch.append(Param(key, text))
    for i in range(0, len(batch), 100):
        mlflow_client.log_batch(run_id, params=batch[i : i + 100])


def metric_name(name: str) -> str:
    return _METRIC_NAME_BAD.sub("_", name)


def log_metrics(
    mlflow_client, run_id: str, metrics: Mapping[str, Any], step: int = 0, prefix: str = ""
) -> None:
    """Finite numbers only (nested dicts flattened with '/'); names sanitised for MLflow."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for key, value in flatten(metrics, sep="/").items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        batch.append(Metric(metric_name(f"{prefix}{key}"), float(value), now, int(step)))
    for i in range(0, len(batch), 500):
        mlflow_client.log_batch(run_id, metrics=batch[i : i + 500])


def epoch_line(m: Mapping[str, Any], epochs: int | None = None) -> str:
    total = f"/{epochs}" if epochs else ""
    return (
        f"epoch {int(m['epoch'])}{total}  loss {m.get('loss', float('nan')):.4f}  "
        f"val mAP {m.get('val_map', float('nan')):.4f}  GAP@10 {m.get('val_gap_at_10', float('nan')):.4f}  "
        f"{m.get('epoch_seconds', float('nan')):.1f}s"
    )


class EpochLogger(_RayCallback):
    """Ray Train callback (runs in the controller, on the driver's node): per-epoch metrics of rank 0 go
    to MLflow once per completed report, with the epoch as step, and a progress line is printed.

    A report only completes when every worker reached it, so an epoch interrupted by a worker failure
    is never logged, and the retried epoch is logged once.
    """

    def __init__(self, tracking_uri: str, run_id: str, epochs: int | None = None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.epochs = epochs
        self._client = None
        self._say = Progress("train")

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = metrics[0] if metrics else {}
        if "epoch" not in m:
            return
        self._say(epoch_line(m, self.epochs))
        try:
            if self._client is None:
                self._client = client(self.tracking_uri)
            per_class = {"val_ap": m.get("val_per_class_ap") or {}}
            scalars = {k: v for k, v in m.items() if k not in ("val_per_class_ap", "epoch")}
            log_metrics(self._client, self.run_id, {**scalars, **per_class}, step=int(m["epoch"]))
        except Exception as e:  # tracking trouble must not kill a training run
            log.warning("could not log epoch metrics to MLflow: %s", storage.redact(str(e)).splitlines()[0])
