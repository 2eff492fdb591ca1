"""The MLflow pyfunc flavour of a saved mumic model: score a DataFrame of image URIs or bytes.

The pyfunc's only artifact is the saved model folder (safetensors + config.json); it is logged as
"models from code" (`pyfunc_model.py`), so neither logging nor loading pickles anything.

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict(pd.DataFrame({"uri": ["s3://bucket/a.jpg", ...]}))   # or {"image": [bytes, ...]}
    → one float column per label (taxonomy order), plus `error` (None, or why the image was unreadable).
    params={"labels": ["a", "b"]} scores any labels instead (zero-shot).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pandas as pd

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; keep the scorer importable without it
    PythonModel = object  # type: ignore[assignment,misc]

MODEL_DIR_KEY = "model_dir"
CODE_FILE = os.path.join(os.path.dirname(__file__), "pyfunc_model.py")
BATCH = 64
_REQUIREMENTS = (
    "torch",
    "open_clip_torch",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "fsspec",
    "s3fs",
    "pyarrow",
)


def signature():
    """Input: a DataFrame with `uri` (string) or `image` (bytes); param `labels` (zero-shot label list)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "uri", required=False), ColSpec("binary", "image", required=False)]),
        params=ParamSchema([ParamSpec("labels", "string", [], (-1,))]),
    )


def pip_requirements() -> list[str]:
    """Pinned runtime requirements of the scorer (listing them spares MLflow a slow inference pass)."""
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


class MumicPyfunc(PythonModel):
    def load_context(self, context) -> None:
        import torch

        from mumic_core import checkpoint

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = checkpoint.load(context.artifacts[MODEL_DIR_KEY], map_location=device)

    def predict(self, context, model_input, params=None):
        from mumic_core.images import ImageError, load_for_model

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        present = [c for c in ("image", "uri") if c in frame.columns and frame[c].notna().any()]
        column = present[0] if present else frame.columns[0]
        labels = list((params or {}).get("labels") or []) or None
        names = labels or self.model.taxonomy.names
        cfg = self.model.config
        scores = np.full((len(frame), len(names)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(frame)
        pixels, rows = [], []
        for i, value in enumerate(frame[column].tolist()):
            try:
                data = value if isinstance(value, bytes | bytearray) else _read(str(value))
                pixels.append(load_for_model(bytes(data), cfg.image_size, resize_mode=cfg.resize_mode))
                rows.append(i)
            except (ImageError, OSError, ValueError) as e:
                errors[i] = " ".join(str(e).split())
        for start in range(0, len(rows), BATCH):
            batch = np.stack(pixels[start : start + BATCH])
            probs = self.model.score_labels(batch, labels) if labels else self.model.score(batch)
            scores[rows[start : start + BATCH]] = probs.float().cpu().numpy()
        out = pd.DataFrame(scores, columns=names, index=frame.index)
        out["error"] = errors
        return out


def _read(uri: str) -> bytes:
    from . import storage

    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise OSError(f"not_found: {storage.redact(uri)}") from None
