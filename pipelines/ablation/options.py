"""What an ablation is told (`AblationConfig`): the data, the options every run shares, the grid, the
baselines and the warm-start protocol. The `mumic ablate` flags and its YAML job config come from it."""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
BASELINES = ("zero_shot", "linear_probe")
_CLI_REQUIRED = {"cli": {"required": True}}  # `mumic ablate` needs it (see jobs/options.py)


class AblationError(ValueError):
    """A user-fixable problem with an ablation config (one line)."""


@dataclass(frozen=True)
class AblationConfig:
    """One ablation: every run trains and evaluates on the same data and splits (methods.md §5)."""

    output: str = Field(
        "",
        description="local folder of results.csv, results.md, derived data, models and checkpoints; the same "
        "folder again resumes",
        json_schema_extra=_CLI_REQUIRED,
    )
    name: str = Field("ablation", pattern=NAME_PATTERN, description="the parent MLflow run (and run names)")
    annotations: str | None = Field(None, description="Parquet/CSV annotations (or `generate`)")
    taxonomy: str | None = Field(None, description="the annotations' taxonomy file")
    generate: dict[str, Any] | None = Field(
        None,
        description="instead of annotations: a generated set with compositional labels under OUTPUT/data, "
        "e.g. {n_images: 900, seed: 0, size: 64}",
    )
    unseen: list[str] = Field(
        default_factory=list,
        description="labels to mark unseen in a taxonomy derived into OUTPUT (dropped from training, scored "
        "zero-shot; ZSL/GZSL metrics)",
    )
    base: dict[str, Any] = Field(
        default_factory=dict, description="`mumic train` options every run shares, e.g. {backbone: mumic-tiny}"
    )
    grid: dict[str, Any] | list[dict[str, Any]] = Field(
        default_factory=lambda: {"loss": ["tempered_learned"]},
        description="axes head, loss, train_mode, seed, init (each a list); a list of grids runs their union",
    )
    loss_presets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="more loss presets, or changed ones: name -> training options"
    )
    baselines: list[Literal[BASELINES]] = Field(
        default_factory=lambda: list(BASELINES), description="rows besides the grid, per seed"
    )
    warm_start: dict[str, Any] = Field(
        default_factory=lambda: {"fraction": 0.5, "new_labels": []},
        description="for init: warm, the first model trains on `fraction` of train without `new_labels`",
    )
    experiment: str = Field("mumic-ablate", description="MLflow experiment of the parent and child runs")
    workdir: str = Field(".", description="folder of the default mlflow.db")
    max_runs: int | None = Field(None, ge=1, description="stop after this many new runs; run again to go on")

    @field_validator("generate", "base", "grid", "loss_presets", "warm_start", mode="before")
    @classmethod
    def _yaml_from_a_flag(cls, value: Any) -> Any:
        """A flag gives text: read it as YAML (`--base '{epochs: 2}'`)."""
        if isinstance(value, str):
            try:
                return yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ValueError(f"not YAML: {str(e).splitlines()[0]}") from None
        return value

    @field_validator("warm_start")
    @classmethod
    def _warm_start_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - {"fraction", "new_labels"})
        if unknown:
            raise ValueError(f"unknown keys {unknown}; known: fraction, new_labels")
        fraction = value.get("fraction", 0.5)
        if not isinstance(fraction, int | float) or not 0 < fraction < 1:
            raise ValueError(f"fraction must be between 0 and 1, not {fraction!r}")
        return {"fraction": float(fraction), "new_labels": list(value.get("new_labels") or [])}

    @model_validator(mode="after")
    def _one_source_of_data(self) -> AblationConfig:
        if bool(self.generate is not None) == bool(self.annotations):
            raise ValueError("give either annotations (with taxonomy) or generate, not both or neither")
        if self.annotations and not self.taxonomy:
            raise ValueError("annotations need their taxonomy")
        return self
