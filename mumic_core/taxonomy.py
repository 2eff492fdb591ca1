"""The label taxonomy: names, prompt templates, per-label prompts and `unseen` flags (contract.md, Taxonomy).

A taxonomy is immutable and hashable by content (`sha256`), so a model version, a run and an output row
can say exactly which label set produced a score vector.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


class TaxonomyError(ValueError):
    """A user-fixable defect in a taxonomy file (one line, names the defect)."""


@dataclass(frozen=True)
class Label:
    name: str
    prompts: tuple[str, ...] = ()
    unseen: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.prompts:
            out["prompts"] = list(self.prompts)
        if self.unseen:
            out["unseen"] = True
        return out


@dataclass(frozen=True)
class Taxonomy:
    labels: tuple[Label, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if not self.labels:
            raise TaxonomyError("taxonomy has no labels")
        if not self.templates:
            raise TaxonomyError("taxonomy has no templates")
        for t in self.templates:
            if not isinstance(t, str) or "{}" not in t:
                raise TaxonomyError(f"template {t!r} must be a string containing '{{}}'")
        seen: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            if not isinstance(label.name, str) or not label.name.strip():
                raise TaxonomyError(f"label #{i} has an empty name")
            if label.name in seen:
                raise TaxonomyError(f"duplicate label name {label.name!r}")
            for p in label.prompts:
                if not isinstance(p, str) or not p.strip():
                    raise TaxonomyError(f"label {label.name!r} has an empty prompt")
            seen[label.name] = i
        self._index.update(seen)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_names(cls, names: Iterable[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> Taxonomy:
        return cls(tuple(Label(str(n)) for n in names), tuple(templates))

    @classmethod
    def from_dict(cls, data: Any) -> Taxonomy:
        if isinstance(data, list):  # a bare list of labels
            data = {"labels": data}
        if not isinstance(data, dict):
            raise TaxonomyError("taxonomy must be a mapping with 'labels' (and optionally 'templates')")
        unknown = set(data) - {"labels", "templates"}
        if unknown:
            raise TaxonomyError(f"unknown taxonomy keys: {sorted(unknown)}")
        raw_labels = data.get("labels")
        if not isinstance(raw_labels, list):
            raise TaxonomyError("taxonomy 'labels' must be a list")
        templates = data.get("templates", list(DEFAULT_TEMPLATES))
        if isinstance(templates, str):
            templates = [templates]
        if not isinstance(templates, list):
            raise TaxonomyError("taxonomy 'templates' must be a list of strings")
        labels = []
        for i, item in enumerate(raw_labels):
            if isinstance(item, str):
                labels.append(Label(item))
            elif isinstance(item, dict):
                extra = set(item) - {"name", "prompts", "unseen"}
                if extra:
                    raise TaxonomyError(f"label #{i}: unknown keys {sorted(extra)}")
                prompts = item.get("prompts") or []
                if isinstance(prompts, str):
                    prompts = [prompts]
                if not isinstance(prompts, list):
                    raise TaxonomyError(f"label #{i}: 'prompts' must be a list of strings")
                unseen = item.get("unseen", False)
                if not isinstance(unseen, bool):
                    raise TaxonomyError(f"label #{i}: 'unseen' must be true or false")
                name = item.get("name")
                if not isinstance(name, str):
                    raise TaxonomyError(f"label #{i} has no name")
                labels.append(Label(name, tuple(prompts), unseen))
            else:
                raise TaxonomyError(f"label #{i} must be a string or a mapping, got {type(item).__name__}")
        return cls(tuple(labels), tuple(templates))

    @classmethod
    def loads(cls, text: str, fmt: str = "yaml") -> Taxonomy:
        import yaml

        try:
            data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise TaxonomyError(f"taxonomy is not valid {fmt.upper()}: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path_or_uri: str | Path) -> Taxonomy:
        """Read a YAML or JSON taxonomy from a local path or any fsspec URI (s3://...)."""
        import fsspec

        uri = str(path_or_uri)
        try:
            with fsspec.open(uri, "r", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise TaxonomyError(f"taxonomy file not found: {uri}") from None
        fmt = "json" if uri.lower().endswith(".json") else "yaml"
        return cls.loads(text, fmt)

    # ---- views --------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise TaxonomyError(f"unknown label {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @property
    def unseen_mask(self) -> list[bool]:
        return [label.unseen for label in self.labels]

    @property
    def seen_names(self) -> list[str]:
        return [label.name for label in self.labels if not label.unseen]

    def prompts_for(self, label: Label | str) -> list[str]:
        """The label's own prompts when given, else every template filled with its name."""
        if isinstance(label, str):
            label = self.labels[self.index(label)] if label in self else Label(label)
        if label.prompts:
            return list(label.prompts)
        return [t.replace("{}", label.name) for t in self.templates]

    def to_dict(self) -> dict[str, Any]:
        return {"templates": list(self.templates), "labels": [lb.to_dict() for lb in self.labels]}

    @property
    def sha256(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def with_labels(self, names: Iterable[str]) -> Taxonomy:
        """A taxonomy over arbitrary label strings that keeps this one's templates (zero-shot scoring)."""
        known = {lb.name: lb for lb in self.labels}
        return Taxonomy(tuple(known.get(n, Label(n)) for n in names), self.templates)

    def encode_labels(self, label_lists: Iterable[Iterable[str]], strict: bool = True):
        """Multi-hot matrix [N, C] (uint8); unknown names raise (strict) or are ignored."""
        import numpy as np

        rows = list(label_lists)
        out = np.zeros((len(rows), len(self.labels)), dtype=np.uint8)
        for i, names in enumerate(rows):
            for n in names:
                j = self._index.get(n)
                if j is None:
                    if strict:
                        raise TaxonomyError(f"unknown label {n!r}")
                    continue
                out[i, j] = 1
        return out
