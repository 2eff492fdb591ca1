"""Model references (`--model`): a saved model folder (local or s3://) or an MLflow `models:/` URI.

Every command resolves a reference here, so retag, tag, search and evaluate agree on what a reference
means and on the (name, version) they record in the output tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from mumic_core import checkpoint
from mumic_core.model import ModelError, MuMIC

from . import storage


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: where the saved model folder is, and the name/version to record."""

    ref: str  # what the user typed
    uri: str  # a folder holding model.safetensors + config.json
    name: str
    version: str


def resolve(ref: str) -> ModelRef:
    """Turn a `--model` value into a model folder URI plus (name, version)."""
    ref = str(ref)
    if ref.startswith("models:/"):
        from . import registry  # MLflow is imported only when a registry reference is used

        return registry.resolve(ref)
    uri = storage.normalize(ref)
    cfg = checkpoint.read_config(uri)  # raises ModelError with a clear line when absent
    name = cfg.get("name") or uri.rstrip("/").rsplit("/", 1)[-1]
    # A folder has no registry version; its weights' identity is the content hash written at save time
    # (or, for older folders, the taxonomy hash), so incremental skips stay correct when it changes.
    version = str(cfg.get("version") or cfg.get("weights_sha256", "")[:12] or "local")
    return ModelRef(ref=ref, uri=uri, name=str(name), version=version)


def load(ref: str | ModelRef, device: str = "cpu") -> tuple[MuMIC, ModelRef]:
    mref = ref if isinstance(ref, ModelRef) else resolve(ref)
    try:
        model = checkpoint.load(mref.uri, map_location=device)
    except ModelError:
        raise
    except Exception as e:  # a corrupt or partial folder: say which, in one line
        raise ModelError(f"cannot load model {mref.ref}: {storage.redact(str(e)).splitlines()[0]}") from e
    return model, mref
