"""Every head's options, checked without torch: a process that only reads and checks saved configs (a
retag driver, `mumic runs`, `mumic vacuum`) validates `model.head_options` from here and never imports
torch (1.5 s of CPU and ~250 MB). The heads themselves (`mumic_core.heads`) use these classes as their
`Options`; that package checks at import that its registry and this one name the same heads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

MAX_TEXT_OPTION = 200  # a template is a short sentence; anything longer is a typo or a hostile file


@dataclass
class HeadOptions:
    """A head's own hyper-parameters, saved in config.json as `model.head_options` and logged to MLflow.

    `TRAIN_PREFIX`: the TrainConfig field `<prefix><name>` sets option `name` (`--decoder-alpha`)."""

    TRAIN_PREFIX: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: Any) -> HeadOptions:
        """Options from a saved or given mapping: unknown names, wrong types and out-of-range values are a
        ValueError naming the option (the model layer turns it into a one-line ModelError)."""
        if isinstance(d, cls):
            d = d.to_dict()
        if not isinstance(d, Mapping):
            raise ValueError(f"head options are an object, not {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(k)[:40] for k in d if k not in known)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(known) or 'none'}")
        out = cls(**{k: _typed(k, v, known[k].default) for k, v in d.items()})
        out.check()
        return out

    @classmethod
    def from_train(cls, flat: Mapping[str, Any]) -> HeadOptions:
        """The options a training config sets through its `<prefix><name>` fields (others keep defaults)."""
        if not cls.TRAIN_PREFIX:
            return cls.from_dict({})
        given = {
            f.name: flat[cls.TRAIN_PREFIX + f.name] for f in fields(cls) if cls.TRAIN_PREFIX + f.name in flat
        }
        return cls.from_dict({k: v for k, v in given.items() if v is not None})

    def check(self) -> None:
        """Ranges; a subclass raises ValueError naming the option."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _typed(name: str, value: Any, default: Any) -> Any:
    """`value` as the type of the option's default (JSON gives ints for floats); anything else refused."""
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str) and len(value) <= MAX_TEXT_OPTION
    if not ok:
        raise ValueError(f"option {name} must be a {kind.__name__}, got {value!r:.40}")
    return value


def in_range(options: HeadOptions, name: str, low: float, high: float) -> None:
    value = getattr(options, name)
    if not low <= value <= high:
        raise ValueError(f"option {name} = {value!r} is outside {low:g}..{high:g}")


@dataclass
class MumicOptions(HeadOptions):
    """None of its own: τ and b are ModelConfig's `learn_tau`, `init_tau`, `use_bias`, `init_bias`
    (where they were before heads existed, so older saved models read unchanged)."""


@dataclass
class MKTOptions(HeadOptions):
    TRAIN_PREFIX = "mkt_"

    top_k: int = 16  # patches averaged in the local score
    train_blocks: int = 2  # stage 1 trains the last `train_blocks` transformer blocks (+ ln_post, proj)
    layer_decay: float = 0.65  # stage 1: block i's LR = lr_image · layer_decay^(L − i)
    distill_weight: float = 1.0  # stage 1: L = L_rank + distill_weight · L_dist
    margin: float = 1.0  # of the ranking loss's hinge
    template: str = "There is a {} in the scene"  # stage 2: its words around {} are learned
    prompt_tuned: bool = False  # set by stage 2: class embeddings then come from the learned template

    def check(self) -> None:
        in_range(self, "top_k", 1, 65_536)
        in_range(self, "train_blocks", 0, 256)
        in_range(self, "layer_decay", 1e-6, 1.0)
        in_range(self, "distill_weight", 0.0, 1e6)
        in_range(self, "margin", 0.0, 1e3)


@dataclass
class ClipDecoderOptions(HeadOptions):
    TRAIN_PREFIX = "decoder_"

    dim: int = 768  # decoder width d (ML-Decoder's decoder_embedding)
    heads: int = 8
    ffn: int = 2048
    dropout: float = 0.1
    alpha: float = 1.0  # weight of L_clip (the alignment of e with the class text embeddings)
    beta: float = 1.0  # weight of the ASL classification loss
    tau: float = 0.07  # temperature of L_clip

    def check(self) -> None:
        in_range(self, "dim", 1, 16_384)
        in_range(self, "heads", 1, 1_024)
        in_range(self, "ffn", 1, 65_536)
        in_range(self, "dropout", 0.0, 0.99)
        in_range(self, "alpha", 0.0, 1e6)
        in_range(self, "beta", 0.0, 1e6)
        in_range(self, "tau", 1e-4, 100.0)
        if self.dim % self.heads:
            raise ValueError(f"option dim = {self.dim} is not a multiple of heads = {self.heads}")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("options alpha and beta are both 0: nothing would train")


# name -> options class, in the order of the head registry (`mumic_core.heads.HEADS`)
HEAD_OPTIONS: dict[str, type[HeadOptions]] = {
    "mumic": MumicOptions,
    "clip_decoder": ClipDecoderOptions,
    "mkt": MKTOptions,
}
HEAD_NAMES: tuple[str, ...] = tuple(HEAD_OPTIONS)


def options_for(name: str, options: Any) -> HeadOptions:
    """The head's options from a mapping (a saved config, or {} for the defaults), checked."""
    if name not in HEAD_OPTIONS:
        raise ValueError(f"unknown head {name!r}; known: {', '.join(HEAD_OPTIONS)}")
    return HEAD_OPTIONS[name].from_dict(options if options is not None else {})
