"""Which score counts as "above threshold" for the rows of each model version: that version's own tuned
thresholds (from a `--model` given, else the registry's `models:/NAME/VERSION`), else a fallback cut-off
that the comparison records (`threshold_source`) and warns about."""

from __future__ import annotations

import os

import numpy as np

from mumic_core import checkpoint
from mumic_core.model_config import ModelError
from mumic_core.taxonomy import Taxonomy

from .. import storage
from ..registry import resolve_model, tracking

Model = tuple[str, str]  # (model_name, model_version) as the tables record them


def _from_config(uri: str) -> dict[str, float]:
    """A saved model's threshold per label name (config.json only: no weights are loaded)."""
    cfg = checkpoint.read_config(uri)
    names = Taxonomy.from_dict(cfg["taxonomy"]).names
    return dict(zip(names, (float(t) for t in cfg["thresholds"]), strict=True))


class Thresholds:
    """Per-label thresholds by model version, looked up once each; `warnings` says where the fallback
    was used and why."""

    def __init__(self, models: list[str], tracking_uri: str | None, workdir: str | None, fallback: float):
        self.fallback = fallback
        self.tracking_uri = tracking_uri or tracking.tracking_uri(workdir)
        self.warnings: list[str] = []
        self.known: dict[Model, dict[str, float] | None] = {}
        self.given: dict[Model, str] = {}
        self._vectors: dict[tuple[Model, tuple[str, ...]], tuple[np.ndarray, np.ndarray]] = {}
        for ref in models:
            mref = resolve_model(ref, self.tracking_uri)
            self.known[(mref.name, mref.version)] = _from_config(mref.uri)
            self.given[(mref.name, mref.version)] = ref

    def unused_refs(self, seen: set[Model]) -> list[str]:
        """The `--model` references whose version made none of the rows compared."""
        return [f"{ref} ({m[0]}/{m[1]})" for m, ref in self.given.items() if m not in seen]

    def vector(self, model: Model, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(threshold per name [C], whether it is the model's own [C]), computed once per model and taxonomy."""
        key = (model, names)
        if key not in self._vectors:
            if model not in self.known:
                self.known[model] = self._lookup(model)
            own = self.known[model] or {}
            mine = np.array([n in own for n in names], bool)
            values = np.array([own.get(n, self.fallback) for n in names], np.float32)
            if own and not mine.all():
                self.warnings.append(
                    f"{model[0]}/{model[1]} has no threshold for {int((~mine).sum())} of its rows' labels: "
                    f"those count above {self.fallback}"
                )
            self._vectors[key] = (values, mine)
        return self._vectors[key]

    def _lookup(self, model: Model) -> dict[str, float] | None:
        name, version = model
        why = self._no_registry(version)
        if why is None:
            try:
                return _from_config(resolve_model(f"models:/{name}/{version}", self.tracking_uri).uri)
            except (ModelError, OSError, tracking.mlflow_error()) as e:  # unreachable, or no such version
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
        self.warnings.append(
            f"no thresholds for {name}/{version} ({storage.redact(why)}): its rows count above {self.fallback} "
            f"(--model REF gives that version's own thresholds, --fallback-threshold another cut-off)"
        )
        return None

    def _no_registry(self, version: str) -> str | None:
        """Why the registry cannot have this version, or None to ask it."""
        if not version.isdigit():
            return "not a registry version: a model folder's hash"
        local = self.tracking_uri.removeprefix("sqlite:///") if self.tracking_uri.startswith("sqlite:///") else None
        if local is not None and not os.path.exists(local):  # asking would create an empty store there
            return f"no registry at {self.tracking_uri}"
        return None
