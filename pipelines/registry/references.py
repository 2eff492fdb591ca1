"""Model references (`--model`): a saved model folder (local or s3://) or an MLflow `models:/` URI.

Every command resolves a reference here, so retag, tag, search, evaluate and the pyfunc agree on what a
reference means and on the (name, version) they record in the output tables.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mumic_core import checkpoint
from mumic_core.model_config import ModelError

from .. import storage
from . import tracking

if TYPE_CHECKING:
    from mumic_core.scoring import Scorer  # annotations only (torch)

MODEL_FOLDER = "mumic_model"  # name of the saved model folder inside the pyfunc's artifacts


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: where the saved model folder is, and the name/version to record."""

    ref: str  # what the user typed
    uri: str  # a folder holding model.safetensors + config.json
    name: str
    version: str


def resolve_model(ref: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> ModelRef:
    """Turn a `--model` value into a model folder URI plus (name, version)."""
    ref = str(ref)
    if ref.startswith("models:/"):
        return _resolve_registered(ref, tracking_uri, cache_dir)
    uri = storage.normalize(ref)
    cfg = checkpoint.read_config(uri)  # raises ModelError with a clear line when absent
    name = cfg.get("name") or uri.rstrip("/").rsplit("/", 1)[-1]
    # A folder has no registry version; its weights' identity is the content hash written at save time
    # (or, for older folders, the taxonomy hash), so incremental skips stay correct when it changes.
    version = str(cfg.get("version") or cfg.get("weights_sha256", "")[:12] or "local")
    return ModelRef(ref=ref, uri=uri, name=str(name), version=version)


def load_scorer(
    ref: str | ModelRef, device: str | None = None, tracking_uri: str | None = None, precision: str = "auto"
) -> tuple[Scorer, ModelRef]:
    """A reference's model, ready to score (`mumic_core.scoring.Scorer`), and what it resolved to."""
    from mumic_core.scoring import Scorer  # torch: not for the processes that only resolve references

    mref = ref if isinstance(ref, ModelRef) else resolve_model(ref, tracking_uri)
    try:
        return Scorer.load(mref.uri, device=device, precision=precision), mref
    except ModelError:
        raise
    except Exception as e:  # a corrupt or partial folder: say which, in one line
        raise ModelError(f"cannot load model {mref.ref}: {storage.redact(str(e)).splitlines()[0]}") from e


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
            versions = c.search_model_versions(f"name = {tracking.filter_value(name, 'model name')}")
            if not versions:
                raise ModelError(f"no versions of model {name!r} in the registry at {_where(uri)}")
            return max(versions, key=lambda v: int(v.version))
        return c.get_model_version(name, str(version))
    except tracking.mlflow_error() as e:
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


def _resolve_registered(ref: str, tracking_uri: str | None, cache_dir: str | None) -> ModelRef:
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
        except tracking.mlflow_error() as e:
            raise ModelError(
                f"cannot download model {name}/{version}: {storage.redact(str(e)).splitlines()[0]}"
            ) from None
        checkpoint.read_config(local)  # complete, or raise
        try:
            os.replace(local, target)
        except OSError:  # another process finished first: theirs is as good
            if not os.path.exists(os.path.join(target, checkpoint.CONFIG)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
