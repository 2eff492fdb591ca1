"""Models by reference and the MLflow side: `references` (what `--model` means: a folder or `models:/`,
resolved to a model folder and loaded as a Scorer), `versions` (register, metrics, promote), `tracking`
(runs, params, metrics, the per-epoch callback) and `pyfunc` (the MLflow flavour)."""

from .references import (
    MODEL_FOLDER,
    ModelRef,
    alias_version,
    get_version,
    load_scorer,
    parse_ref,
    resolve_model,
)
from .versions import Promotion, log_model_version, promote, set_alias, version_metric

__all__ = [
    "MODEL_FOLDER",
    "ModelRef",
    "Promotion",
    "alias_version",
    "get_version",
    "load_scorer",
    "log_model_version",
    "parse_ref",
    "promote",
    "resolve_model",
    "set_alias",
    "version_metric",
]
