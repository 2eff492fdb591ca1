"""The MLflow pyfunc flavour of a saved mumic model: score a DataFrame of image URIs or bytes.

The pyfunc's only artifact is the saved model folder (safetensors + config.json); it is logged as
"models from code" (`pyfunc_model.py`), so neither logging nor loading pickles anything.

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict(pd.DataFrame({"uri": ["s3://bucket/a.jpg", ...]}))   # or {"image": [bytes, ...]}
    → one float column per label (taxonomy order), plus `error` (None, or why the image was unreadable).
    Local paths are read only inside the folders of MUMIC_ALLOWED_ROOTS (`forbidden` otherwise).
    params={"labels": ["a", "b"]} scores any labels instead (zero-shot).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from mumic_core.images import ImageError
from mumic_core.scoring import Scorer

from .. import storage

MODEL_DIR_KEY = "model_dir"
ROOTS_ENV = "MUMIC_ALLOWED_ROOTS"  # os.pathsep-separated local folders a served model may read images from
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
    "boto3",
    "pyarrow",
    "pydantic",
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


def allowed_roots() -> tuple[str, ...]:
    """Where a served model may read local image files: the folders in MUMIC_ALLOWED_ROOTS, else none
    (a model server takes bytes or s3:// URIs; a path from a request must not read the server's disk)."""
    return storage.confine([r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r])


class MumicPyfunc(PythonModel):
    def load_context(self, context) -> None:
        self.scorer = Scorer.load(context.artifacts[MODEL_DIR_KEY])

    def predict(self, context, model_input, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        present = [c for c in ("image", "uri") if c in frame.columns and frame[c].notna().any()]
        column = present[0] if present else frame.columns[0]
        labels = list((params or {}).get("labels") or []) or None
        values = frame[column].tolist()
        errors: list[str | None] = [None] * len(frame)
        pixels, rows = [], []
        uris = {i: str(v) for i, v in enumerate(values) if not isinstance(v, bytes | bytearray)}
        reads = storage.read_many(list(uris.values()), threads=8, roots=allowed_roots())
        read = dict(zip(uris, reads, strict=True))
        for i, value in enumerate(values):
            data, failure = (bytes(value), None) if i not in read else read[i]
            if failure is not None:
                errors[i] = str(failure)
                continue
            try:
                pixels.append(self.scorer.pixels(data))
                rows.append(i)
            except ImageError as e:
                errors[i] = str(e)
        names = labels or self.scorer.names
        scores = np.full((len(frame), len(names)), np.nan, dtype=np.float32)
        if rows:
            scores[rows] = self.scorer.predict(np.stack(pixels), labels, batch_size=BATCH).scores
        out = pd.DataFrame(scores, columns=names, index=frame.index)
        out["error"] = errors
        return out
