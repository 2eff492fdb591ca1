"""An ablation's plan: the grid expanded into cells, the loss presets as training options, and the runs
(baselines, warm-start sources, trained cells) in order, each with the config hash that resume keys on."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from mumic_core.model_config import ModelConfig, ModelError

from ..train.config import TrainConfig
from .options import AblationConfig, AblationError

AXES = ("head", "loss", "train_mode", "seed", "init")
BASE, WARM = "base", "warm"  # init axis: from the base backbone; warm-started (warm_start protocol)

# Loss presets (methods.md §1 and §3.2) as training options. plain_bce: the sigmoid of the cosine itself
# (τ fixed at 1); tempered_*: MuMIC's tempered sigmoid, τ learned from the backbone's value or fixed at
# the CLIP checkpoints' ≈ 0.01; focal and ASL weight the tempered BCE (τ learned).
LOSS_PRESETS: dict[str, dict[str, Any]] = {
    "plain_bce": {"learn_tau": False, "init_tau": 1.0, "loss_weighting": "none"},
    "tempered_learned": {"learn_tau": True, "init_tau": None, "loss_weighting": "none"},
    "tempered_fixed": {"learn_tau": False, "init_tau": 0.01, "loss_weighting": "none"},
    "focal": {"learn_tau": True, "init_tau": None, "loss_weighting": "focal"},
    "asl": {"learn_tau": True, "init_tau": None, "loss_weighting": "asymmetric"},
}
# Set per run by the ablation itself, not by `base`.
RESERVED = ("annotations", "taxonomy", "init", "run_name", "register", "alias", "workdir", "storage_path",
            "experiment", "artifact_location", "tracking_uri", "fault")
# Where a run is kept and what it is called: not part of what it computes (not hashed).
NOT_HASHED = ("run_name", "workdir", "storage_path", "experiment", "artifact_location", "tracking_uri",
              "register", "alias", "fault", "max_failures", "num_to_keep", "annotations", "taxonomy")
PROBE_VERSION = "ovr-logistic-standardised-v1"  # change when the linear probe changes


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    head: str
    loss: str
    train_mode: str
    seed: int
    init: str = BASE

    @property
    def name(self) -> str:
        init = "" if self.init == BASE else "-warm" if self.init == WARM else f"-init{_short_hash(self.init)}"
        return f"{self.head}-{self.loss}-{self.train_mode}-s{self.seed}{init}"

    def describe(self) -> str:
        return f"head={self.head}, loss={self.loss}, train_mode={self.train_mode}, seed={self.seed}, init={self.init}"


@dataclass(frozen=True)
class Step:
    """One run of the plan: a baseline, a warm-start source or a trained cell."""

    kind: str  # zero_shot | linear_probe | warm_source | train
    name: str  # unique within the plan
    cell: Cell
    options: dict[str, Any] = field(hash=False)  # TrainConfig options (no data, names or places)
    data: str = "full"  # full | earlier (the warm-start source's share of the annotations)
    source: str | None = None  # the warm_source step whose model a warm run starts from
    config_hash: str = ""

    def describe(self) -> str:
        if self.kind in ("zero_shot", "linear_probe"):
            return f"{self.kind}, seed={self.cell.seed}"
        what = "warm-start source on the earlier annotations, " if self.kind == "warm_source" else ""
        return what + self.cell.describe()


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _listed(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def expand(cfg: AblationConfig) -> list[Cell]:
    """Every cell of the grid (or the union of a list of grids), in order, each once."""
    grids = cfg.grid if isinstance(cfg.grid, list) else [cfg.grid]
    defaults = {
        "head": cfg.base.get("head", ModelConfig.head),
        "loss": "tempered_learned",
        "train_mode": cfg.base.get("train_mode", "both"),
        "seed": cfg.base.get("seed", 0),
        "init": BASE,
    }
    cells: dict[Cell, None] = {}
    for grid in grids:
        if not isinstance(grid, dict):
            raise AblationError(f"grid: each grid is a mapping of axis: values, not {type(grid).__name__}")
        unknown = sorted(set(grid) - set(AXES))
        if unknown:
            raise AblationError(f"grid: unknown axes {unknown}; axes are {', '.join(AXES)}")
        axes = [_listed(grid.get(axis, defaults[axis])) for axis in AXES]
        for head, loss, mode, seed, init in itertools.product(*axes):
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise AblationError(f"grid: seed must be an integer, not {seed!r}")
            cells[Cell(str(head), str(loss), str(mode), seed, str(init))] = None
    if not cells:
        raise AblationError("grid: no cells (an axis has no values)")
    return list(cells)


def train_options(cfg: AblationConfig, cell: Cell) -> dict[str, Any]:
    """The training options of a cell: base, then its loss preset, train mode, seed and head; checked."""
    reserved = sorted(set(cfg.base) & set(RESERVED))
    if reserved:
        raise AblationError(f"base: {reserved} are set by the ablation itself (data, init, names, places)")
    presets = {**LOSS_PRESETS, **cfg.loss_presets}
    if cell.loss not in presets:
        raise AblationError(f"grid: unknown loss {cell.loss!r}; known: {', '.join(presets)}")
    options = {**cfg.base, **presets[cell.loss], "train_mode": cell.train_mode, "seed": cell.seed}
    try:
        ModelConfig(head=cell.head)
    except ModelError as e:
        raise AblationError(f"grid: head {cell.head!r}: {e}") from None
    if "head" in {f.name for f in fields(TrainConfig)}:
        options["head"] = cell.head
    elif cell.head != ModelConfig.head:
        raise AblationError(f"grid: head {cell.head!r}: training here has no head option yet")
    try:
        TrainConfig.from_dict({**options, "annotations": "-", "taxonomy": "-"})  # unknown names refused too
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise AblationError(f"cell {cell.name}: {where}: {first['msg']} (got {first['input']!r:.60})") from None
    except ValueError as e:
        raise AblationError(f"cell {cell.name}: {e}") from None
    return options


def config_hash(kind: str, options: dict[str, Any], **identity: Any) -> str:
    """What a run computes, hashed: its kind, its options and the identity of its data and start."""
    hashed = {k: v for k, v in options.items() if k not in NOT_HASHED}
    text = json.dumps({"kind": kind, "options": hashed, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def steps(cfg: AblationConfig, cells: list[Cell], data: str, earlier: str | None) -> list[Step]:
    """The runs in order: baselines per seed, then each cell (a warm cell after its source).

    `data` and `earlier` identify the annotations + taxonomy (content hashes) of the full set and of the
    warm-start source's share."""
    out: list[Step] = []
    for seed in dict.fromkeys(c.seed for c in cells):
        start = Cell(cells[0].head, "untrained", "none", seed)
        options = {**cfg.base, "seed": seed}  # the starting model of every cell with this seed
        for kind in cfg.baselines:
            extra = {"probe": PROBE_VERSION} if kind == "linear_probe" else {}
            h = config_hash(kind, options, data=data, **extra)
            out.append(Step(kind, f"{kind}-s{seed}", start, options, config_hash=h))
    sources: dict[str, Step] = {}
    for cell in cells:
        options = train_options(cfg, cell)
        if cell.init == WARM:
            if earlier is None:
                raise AblationError("init: warm needs the warm-start share of the annotations")
            src_cell = Cell(cell.head, cell.loss, cell.train_mode, cell.seed, BASE)
            src_hash = config_hash("warm_source", options, data=earlier)
            if src_hash not in sources:
                sources[src_hash] = Step("warm_source", f"{src_cell.name}-earlier", src_cell, options, "earlier",
                                         config_hash=src_hash)
                out.append(sources[src_hash])
            h = config_hash("train", options, data=data, init=WARM, source=src_hash)
            out.append(Step("train", cell.name, cell, options, source=sources[src_hash].name, config_hash=h))
            continue
        init = {} if cell.init == BASE else {"init": cell.init}
        h = config_hash("train", {**options, **init}, data=data)
        out.append(Step("train", cell.name, cell, {**options, **init}, config_hash=h))
    return out
