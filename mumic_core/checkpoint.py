"""Saved models: a folder (local or any fsspec URI such as s3://) with `model.safetensors` + `config.json`.

The JSON holds everything needed to rebuild the model without the code that trained it: the resolved
open_clip architecture, the head and its options, the taxonomy, tau, bias, thresholds and preprocessing.
The safetensors file also holds, beside the weights, the class embeddings of the model's taxonomy (format
3, `CLASS_EMBEDDINGS`): a loaded model scores without running every prompt through the text tower first
(3 s for 32 labels of ViT-B-32 on a CPU core; ~30x that for 1000 labels, by extrapolation). Loading reads those two
files and nothing else (no code in the folder runs, nothing is unpickled); a config that is not JSON, too
big, has fields this version does not know or absurd sizes, or weights whose sha256 differs from the
config's `weights_sha256`, is a one-line ModelError.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from safetensors import SafetensorError

from .model_config import ModelConfig, ModelError, _listed
from .taxonomy import Taxonomy

# torch and the model are imported where a model is built or saved: reading and checking a config needs
# neither (a retag driver does only that)
if TYPE_CHECKING:
    import torch

    from .model import MuMIC  # annotations only

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 3  # 2: heads (model.head_options; the head's weights under `head.`); 3: CLASS_EMBEDDINGS
# Not a weight: the [C, D] fp32 class embeddings of the saved taxonomy, made as a Scorer would make them, and
# the digest of what they were made for (the model config and the taxonomy) in the file's metadata. A config
# edited afterwards (another taxonomy, head options) no longer matches: the loaded model then makes its own.
CLASS_EMBEDDINGS = "mumic.class_embeddings"
CLASS_EMBEDDINGS_FOR = "mumic_class_embeddings_for"
# Format 1 (MuMIC only) kept its τ and b at the top of the state dict; read as the mumic head's.
FORMAT_1_KEYS = {"log_tau": "head.log_tau", "bias": "head.bias"}
MAX_CONFIG_BYTES = 16 << 20  # a real config.json is a few KB (a large taxonomy: a few hundred KB)

# What config_dict writes, and what `extra` may add (train checkpoints: epoch; contract.md: name, version).
CONFIG_KEYS = (
    "format_version",
    "mumic_version",
    "model",
    "taxonomy",
    "taxonomy_sha256",
    "tau",
    "bias",
    "thresholds",
    "preprocessing",
    "weights_sha256",
)
EXTRA_KEYS = ("name", "version", "epoch", "run_id", "metrics")
PREPROCESSING_KEYS = ("image_size", "mean", "std", "resize_mode", "input")


def _mumic_version() -> str:
    try:
        return version("mumic")
    except PackageNotFoundError:
        return "unknown"


def _join(base: str, name: str) -> str:
    return f"{str(base).rstrip('/')}/{name}"


def config_dict(model: MuMIC, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "mumic_version": _mumic_version(),
        "model": model.config.to_dict(),
        "taxonomy": model.taxonomy.to_dict(),
        "taxonomy_sha256": model.taxonomy.sha256,
        **model.head.summary(),  # tau, bias: where the head has them
        "thresholds": [float(t) for t in model.thresholds.tolist()],
        "preprocessing": {
            "image_size": model.config.image_size,
            "mean": list(model.config.mean),
            "std": list(model.config.std),
            "resize_mode": model.config.resize_mode,
            "input": "uint8 RGB [3,H,W], normalised on the model's device",
        },
        **(extra or {}),
    }


def _embeddings_for(model: MuMIC) -> str:
    """What a model's class embeddings depend on besides its weights: its config (architecture, head and
    head options, train mode) and its taxonomy."""
    what = {"model": model.config.to_dict(), "taxonomy_sha256": model.taxonomy.sha256}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def class_embeddings(model: MuMIC) -> torch.Tensor:
    """The model's taxonomy's class embeddings [C, D] as a Scorer makes them: eval mode, no gradient, fp32
    without autocast or TF32, not from the model's cache (a training step's may differ); on the CPU."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    device = model.pixel_mean.device
    matmul = torch.get_float32_matmul_precision()
    try:
        model.eval()
        torch.set_float32_matmul_precision("highest")
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            emb = model.head.encode_classes(model, model.taxonomy)
    finally:
        torch.set_float32_matmul_precision(matmul)
        for m, training in modes:
            m.training = training
    return emb.detach().to("cpu", torch.float32).contiguous()


def state_bytes(model: MuMIC) -> bytes:
    """The weights and the class embeddings (`CLASS_EMBEDDINGS`) as one safetensors file."""
    from safetensors.torch import save as st_save

    # safetensors refuses shared storage; clone makes each tensor its own
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    state[CLASS_EMBEDDINGS] = class_embeddings(model)
    metadata = {"format": "pt", "mumic_format_version": str(FORMAT_VERSION), CLASS_EMBEDDINGS_FOR: _embeddings_for(model)}
    return st_save(state, metadata=metadata)


def weights_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved model file's tensors less what is not a weight (`CLASS_EMBEDDINGS`): for load_state_dict."""
    return {k: v for k, v in state.items() if k != CLASS_EMBEDDINGS}


def _metadata(weights: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's JSON header (8-byte little-endian length, then the JSON)."""
    try:
        n = int.from_bytes(weights[:8], "little")
        meta = json.loads(weights[8 : 8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _seed_saved_embeddings(model: MuMIC, saved: torch.Tensor | None, weights: bytes) -> None:
    """Serve the saved class embeddings when they were made for this config and taxonomy, else nothing
    (the model makes its own on first use)."""
    import torch

    if saved is None or _metadata(weights).get(CLASS_EMBEDDINGS_FOR) != _embeddings_for(model):
        return
    if saved.dtype != torch.float32 or saved.ndim != 2 or saved.shape[0] != len(model.taxonomy):
        return
    model.seed_class_embeddings(saved)


def save(model: MuMIC, path_or_uri: str | Path, extra: dict[str, Any] | None = None) -> str:
    """Write the model folder; returns its URI. `extra` adds keys to config.json (EXTRA_KEYS only, so that
    what is saved can be loaded: e.g. metrics, run id)."""
    unknown = sorted(set(extra or {}) - set(EXTRA_KEYS))
    if unknown:
        raise ModelError(
            f"config.json cannot hold {', '.join(unknown)}; extra keys are {', '.join(EXTRA_KEYS)}"
        )
    uri = str(path_or_uri)
    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    weights = state_bytes(model)
    with fsspec.open(_join(uri, WEIGHTS), "wb") as f:
        f.write(weights)
    # config last: a folder with config.json is a complete model
    cfg = config_dict(model, {"weights_sha256": hashlib.sha256(weights).hexdigest(), **(extra or {})})
    with fsspec.open(_join(uri, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)
    return uri


def read_config(path_or_uri: str | Path) -> dict[str, Any]:
    """The folder's config.json, checked (check_config); at most MAX_CONFIG_BYTES are read."""
    uri = str(path_or_uri)
    where = _join(uri, CONFIG)
    try:
        with fsspec.open(where, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise ModelError(f"no saved model at {uri} (missing {CONFIG})") from None
    except IsADirectoryError:
        raise ModelError(f"{where} is a folder, not a model config") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelError(f"{where} is over {MAX_CONFIG_BYTES >> 20} MiB: not a model config")
    cfg = _parse_json(raw, where)
    check_config(cfg, where)
    return cfg


def _parse_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelError(
            f"{where} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})"
        ) from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{where} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # an integer of 5000 digits; arrays nested 100000 deep
        raise ModelError(f"{where} is not a usable JSON document ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{where} must hold a JSON object, not {type(cfg).__name__}")
    return cfg


def check_config(cfg: dict[str, Any], where: str = CONFIG) -> None:
    """Refuse, in one line naming them, fields this version does not know (top level, "model",
    "preprocessing"), a newer format, and model sizes out of bounds (ModelConfig.from_dict)."""
    unknown = [k for k in cfg if k not in CONFIG_KEYS and k not in EXTRA_KEYS]
    if unknown:
        raise ModelError(
            f"{where}: unknown field(s) {_listed(unknown)}; a model config has {', '.join(CONFIG_KEYS)}"
        )
    fmt = cfg.get("format_version", 0)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise ModelError(f"{where}: format_version must be an integer, not {fmt!r:.40}")
    if fmt > FORMAT_VERSION:
        raise ModelError(f"model format {fmt} is newer than this mumic understands")
    for key in ("model", "taxonomy"):
        if not isinstance(cfg.get(key), dict):
            raise ModelError(f"{where}: {key!r} must be a JSON object")
    pre = cfg.get("preprocessing", {})
    extra = [k for k in pre if k not in PREPROCESSING_KEYS] if isinstance(pre, dict) else None
    if extra is None or extra:
        raise ModelError(f"{where}: 'preprocessing' must be an object of {', '.join(PREPROCESSING_KEYS)}")
    sha = cfg.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha)):
        raise ModelError(f"{where}: weights_sha256 must be 64 lowercase hex digits, not {sha!r:.80}")
    try:
        ModelConfig.from_dict(cfg["model"])
    except ModelError as e:
        raise ModelError(f"{where}: {e}") from None


def from_bytes(
    cfg: dict[str, Any],
    weights: bytes,
    map_location: str | torch.device = "cpu",
    source: str = "saved model",
) -> MuMIC:
    """A model from a config dict and the bytes of its safetensors file; checks both before building."""
    from safetensors.torch import load as st_load

    from .model import MuMIC, NoRandomInit  # torch: only where a model is built (see the module's imports)

    check_config(cfg, f"{source} config")
    expected = cfg.get("weights_sha256")  # older folders have none: nothing to check against
    actual = hashlib.sha256(weights).hexdigest() if expected is not None else None
    if actual != expected:
        raise ModelError(
            f"{source}: {WEIGHTS} has sha256 {actual[:16]}..., config.json says {expected[:16]}...: "
            "the weights were replaced or only partly copied"
        )
    try:
        state = st_load(weights)  # safetensors: a JSON header and raw tensors; it never unpickles
    except SafetensorError as e:
        why = " ".join(str(e).split())[:120]
        raise ModelError(f"{source}: {WEIGHTS} is not a safetensors file ({why})") from None
    saved_embeddings = state.pop(CLASS_EMBEDDINGS, None)
    if cfg.get("format_version", 0) < 2:
        state = {FORMAT_1_KEYS.get(k, k): v for k, v in state.items()}
    config = ModelConfig.from_dict(cfg["model"])
    try:
        with NoRandomInit():  # every weight is loaded next: drawing random ones first is wasted time
            model = MuMIC(config, Taxonomy.from_dict(cfg["taxonomy"]))
    except ModelError as e:
        raise ModelError(f"{source}: {e}") from None
    try:
        missing, unexpected = _load_state(model, state)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise ModelError(
            f"{source}: saved weights do not fit the config: {str(e).splitlines()[-1].strip()}"
        ) from None
    if missing or unexpected:
        raise ModelError(
            f"saved weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.set_train_mode(config.train_mode)
    model = model.to(map_location).eval()
    _seed_saved_embeddings(model, saved_embeddings, weights)
    return model


def _load_state(model: MuMIC, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """`state` into `model` (strict=False: the caller names what is missing). The loaded tensors become the
    model's own, no second copy (each owns its memory: safetensors.torch.load gives writable buffers), in
    the dtype the model built them in, as a copy would cast them; a model with tied weights (one tensor
    under two names) is copied into instead, so that they stay tied."""
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v for k, v in state.items()}
    tied = sum(1 for _ in model.named_parameters(remove_duplicate=False)) != len(list(model.parameters()))
    return model.load_state_dict(state, strict=False, assign=not tied)


def load(path_or_uri: str | Path, map_location: str | torch.device = "cpu") -> MuMIC:
    """Rebuild a saved model (eval mode) from a local folder or a URI such as s3://bucket/models/v3.

    Reads config.json and model.safetensors only: other files in the folder (code, pickles) are ignored."""
    uri = str(path_or_uri)
    cfg = read_config(uri)
    try:
        with fsspec.open(_join(uri, WEIGHTS), "rb") as f:
            weights = f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise ModelError(f"saved model at {uri} has no {WEIGHTS}") from None
    return from_bytes(cfg, weights, map_location, source=uri)
