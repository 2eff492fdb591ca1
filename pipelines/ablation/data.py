"""The data an ablation runs on, fixed once for every run: a generated set with compositional labels or
given annotations, the taxonomy with its `unseen` labels, and the warm-start protocol's earlier share."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mumic_core import synthetic
from mumic_core.taxonomy import Label, Taxonomy

from .. import annotations, storage
from .options import AblationConfig, AblationError

GENERATE_KEYS = {"n_images": 900, "seed": 0, "size": 64}


@dataclass(frozen=True)
class DataSet:
    """Annotations + taxonomy as every run of the ablation reads them."""

    annotations: str
    taxonomy_path: str
    taxonomy: Taxonomy
    fingerprint: str  # sha256 of the annotations' bytes and of the taxonomy


def prepare(cfg: AblationConfig, out: Path) -> DataSet:
    """The full set: given or generated, with `cfg.unseen` marked in a taxonomy written under `out`."""
    if cfg.generate is not None:
        ann_uri, tax_uri = _generated(cfg.generate, out / "data")
    else:
        ann_uri, tax_uri = storage.normalize(cfg.annotations), cfg.taxonomy
    taxonomy = Taxonomy.load(tax_uri)
    if cfg.unseen:
        missing = [n for n in cfg.unseen if n not in taxonomy]
        if missing:
            raise AblationError(f"unseen: {missing} are not labels of {tax_uri}")
        labels = tuple(Label(lb.name, lb.prompts, lb.unseen or lb.name in cfg.unseen) for lb in taxonomy.labels)
        taxonomy = Taxonomy(labels, taxonomy.templates)
        tax_uri = _write_taxonomy(taxonomy, out / "taxonomy.json")
    return DataSet(ann_uri, tax_uri, taxonomy, _fingerprint(ann_uri, taxonomy))


def earlier(full: DataSet, warm_start: dict[str, Any], out: Path, **split_options: float) -> DataSet:
    """The simulated earlier annotations a warm-started run continues from: `fraction` of the training rows
    (by a hash of the image id), every val/test row, and a taxonomy without `new_labels` (the labels the
    fresh annotations add)."""
    new_labels = list(warm_start.get("new_labels") or [])
    missing = [n for n in new_labels if n not in full.taxonomy]
    if missing:
        raise AblationError(f"warm_start.new_labels: {missing} are not labels of the taxonomy")
    ann = annotations.load(full.annotations, full.taxonomy, drop_unseen=False, require=(), **split_options)
    frame = ann.frame
    share = [_unit_hash(i) < warm_start["fraction"] for i in frame["image_id"]]
    keep = (frame["split"] != "train") | pd.Series(share, index=frame.index)
    frame = frame[keep].copy()
    gone = set(new_labels)
    for column in ("labels", "unknown_labels"):
        frame[column] = [[n for n in names if n not in gone] for names in frame[column]]
    folder = out / "warm_start"
    folder.mkdir(parents=True, exist_ok=True)
    ann_path = folder / "annotations.parquet"
    frame[["image_id", "uri", "labels", "unknown_labels", "split"]].to_parquet(ann_path, index=False)
    taxonomy = Taxonomy(tuple(lb for lb in full.taxonomy.labels if lb.name not in gone), full.taxonomy.templates)
    tax_uri = _write_taxonomy(taxonomy, folder / "taxonomy.json")
    return DataSet(str(ann_path), tax_uri, taxonomy, _fingerprint(str(ann_path), taxonomy))


def _generated(options: dict[str, Any], root: Path) -> tuple[str, str]:
    """`synthetic.write_dataset` with compositional labels, once per set of options (then reused)."""
    unknown = sorted(set(options) - set(GENERATE_KEYS))
    if unknown:
        raise AblationError(f"generate: unknown keys {unknown}; known: {', '.join(GENERATE_KEYS)}")
    opts = {**GENERATE_KEYS, **options}
    lowest = {"n_images": 1, "seed": 0, "size": 16}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= lowest[k] for k, v in opts.items()):
        raise AblationError(f"generate: integers n_images >= 1, seed >= 0, size >= 16; got {opts}")
    folder = root / f"generated-n{opts['n_images']}-s{opts['seed']}-{opts['size']}px"
    ann_path, tax_path = folder / "annotations.parquet", folder / "taxonomy.json"
    if not ann_path.exists():  # written last: its presence means the set is complete
        rows = synthetic.write_dataset(folder, opts["n_images"], seed=opts["seed"], size=opts["size"],
                                       compositional=True)
        _write_taxonomy(synthetic.taxonomy(compositional=True), tax_path)
        pd.DataFrame(rows).to_parquet(folder / "annotations.tmp.parquet", index=False)
        (folder / "annotations.tmp.parquet").replace(ann_path)
    return str(ann_path), str(tax_path)


def _write_taxonomy(taxonomy: Taxonomy, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(taxonomy.to_dict(), indent=2))
    return str(path)


def _fingerprint(ann_uri: str, taxonomy: Taxonomy) -> str:
    digest = hashlib.sha256(storage.read_bytes(ann_uri)).hexdigest()
    return hashlib.sha256(f"{digest} {taxonomy.sha256}".encode()).hexdigest()


def _unit_hash(image_id: str) -> float:
    """A stable number in [0, 1) per image id, independent of the train/val/test hash split."""
    return int(hashlib.sha256(f"warm-start:{image_id}".encode()).hexdigest()[:8], 16) / 2**32
