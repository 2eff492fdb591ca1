"""The one device and precision rule of every scoring path (retag, evaluation, validation, `mumic tag`).

Only the image tower changes number format: bf16 autocast (GPU) or int8 dynamic quantisation of its Linear
layers (CPU). The text tower and the head (similarity / τ + b, sigmoid) stay fp32, because the per-label
thresholds were tuned on fp32 scores and a bf16 logit at τ≈0.01 is off by ±0.1.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# the rule itself is torch-free (a retag driver resolves it without torch); re-exported here
from .model_config import PRECISIONS, ModelError, Precision, resolve  # noqa: F401


class DeviceError(ModelError):
    """The device asked for is not usable here (a GPU reserved, but CUDA unavailable to torch)."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` checked (cuda asked for but unusable is an error, never a silent CPU run); None: cuda
    when torch can use it, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"a GPU was asked for (device {chosen}) but torch {torch.__version__} (CUDA "
            f"{torch.version.cuda or 'none'}) cannot use one here: no GPU visible to this process, or an "
            "NVIDIA driver too old for this torch build; not falling back to the CPU"
        )
    return chosen


def prepare(model: nn.Module, precision: str) -> nn.Module:
    """The model made ready for `precision` (resolved): int8 quantises its image tower IN PLACE (the
    caller owns the model), so only a Scorer that loaded its own model may ask for it."""
    if precision == "int8":
        quantize_image_tower(model)
    return model


def quantize_image_tower(model: nn.Module) -> None:
    """int8 weights, activations quantised per batch, for every Linear of `model.clip.visual`.

    nn.MultiheadAttention's input projection is a bare parameter that quantize_dynamic skips, so each
    attention becomes `LinearAttention` first (the same maths through two Linear layers): without it a
    third of ViT-B-32's block FLOPs would stay fp32. The image projection (`proj`), the patch stem (a conv)
    and the layer norms stay fp32.
    """
    visual = model.clip.visual
    for parent in list(visual.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, LinearAttention.from_mha(child))
    with warnings.catch_warnings():
        # torch 2.14 still ships eager dynamic quantisation and marks it deprecated in favour of torchao,
        # which is not a dependency; the result is checked against fp32 by the tests and the benchmarks
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.ao.quantization.quantize_dynamic(visual, {nn.Linear}, dtype=torch.qint8, inplace=True)


class LinearAttention(nn.Module):
    """nn.MultiheadAttention's self-attention (no mask, no dropout, weights not returned) with its
    projections as nn.Linear, so that dynamic quantisation reaches them."""

    def __init__(self, dim: int, heads: int, batch_first: bool):
        super().__init__()
        self.heads, self.batch_first = heads, batch_first
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> LinearAttention:
        if not mha._qkv_same_embed_dim or mha.in_proj_bias is None or mha.bias_k is not None:
            raise ModelError("int8: only plain self-attention layers (one in_proj with a bias) are supported")
        out = cls(mha.embed_dim, mha.num_heads, mha.batch_first)
        with torch.no_grad():
            out.in_proj.weight.copy_(mha.in_proj_weight)
            out.in_proj.bias.copy_(mha.in_proj_bias)
            out.out_proj.weight.copy_(mha.out_proj.weight)
            out.out_proj.bias.copy_(mha.out_proj.bias)
        return out.to(mha.in_proj_weight.device)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        if attn_mask is not None or (key is not None and key is not query):
            raise ModelError("int8: the image tower's attention has no mask and attends to itself")
        x = query if self.batch_first else query.transpose(0, 1)  # [B, T, D]
        b, t, d = x.shape
        qkv = self.in_proj(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, T, D/H]
        out = self.out_proj(attended.transpose(1, 2).reshape(b, t, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


@contextlib.contextmanager
def image_tower_autocast(model: nn.Module, precision: str, device: torch.device) -> Iterator[None]:
    """For the length of a block: the image tower under bf16 autocast, its output cast back to fp32, so
    whatever head follows computes in fp32. Nothing changes for fp32 / int8, nor outside the block (the
    model may be a training model being validated)."""
    if precision != "bf16":
        yield
        return
    visual = model.clip.visual
    tower_forward = visual.forward

    def forward(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = tower_forward(*args, **kwargs)
        return _as_fp32(out)

    before = visual.__dict__.get("forward")
    visual.forward = forward  # an instance attribute: nn.Module.__call__ looks it up before the class's
    try:
        yield
    finally:
        if before is None:
            del visual.forward
        else:
            visual.forward = before


def _as_fp32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple | list):
        return type(out)(_as_fp32(o) for o in out)
    return out
