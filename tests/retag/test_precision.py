"""The precision rule (`mumic_core.precision`): which number format the image tower runs in, the head in
fp32 whatever the tower's, and int8 / bf16 scores that agree with fp32 on a trained model."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from mumic_core import metrics, synthetic
from mumic_core import precision as precision_rule
from mumic_core.images import preprocess
from mumic_core.model import ModelError
from mumic_core.scoring import Scorer

CPU = torch.device("cpu")


def option_choices(schema, name: str) -> tuple:
    return typing.get_args(schema.__pydantic_fields__[name].annotation)


def test_every_command_offers_the_precisions_of_the_one_rule():
    from jobs.cmd_evaluate import EvaluateArgs
    from jobs.cmd_tag import TagArgs
    from pipelines.retag import RetagOptions

    for schema in (RetagOptions, TagArgs, EvaluateArgs):
        assert option_choices(schema, "precision") == precision_rule.PRECISIONS, schema.__name__
        assert schema.__pydantic_fields__["precision"].default == "auto"


def test_auto_is_bf16_on_a_gpu_and_fp32_on_a_cpu_and_int8_is_cpu_only():
    assert precision_rule.resolve("auto", torch.device("cuda")) == "bf16"
    assert precision_rule.resolve(None, CPU) == "fp32"
    assert precision_rule.resolve("int8", CPU) == "int8"
    assert precision_rule.resolve("bf16", CPU) == "bf16"  # allowed; rarely faster without AMX / avx512_bf16
    with pytest.raises(ModelError, match="int8.*CPU only"):
        precision_rule.resolve("int8", torch.device("cuda"))
    with pytest.raises(ModelError, match="unknown precision"):
        precision_rule.resolve("fp8", CPU)


def test_bf16_runs_the_image_tower_in_bf16_and_the_head_in_fp32(tiny_model_untrained):
    model = tiny_model_untrained
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    seen = []
    hook = model.clip.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    try:
        with torch.no_grad(), precision_rule.image_tower_autocast(model, "bf16", CPU):
            out = model(pixels)
    finally:
        hook.remove()
    assert seen == [torch.bfloat16], "the tower's matmuls run in bf16"
    assert out["img_emb"].dtype == out["logits"].dtype == out["probs"].dtype == torch.float32
    # the head's maths from the (bf16-tower) embedding, in fp32 here: equal, not just close (a bf16
    # head at this tau would be off by ~0.1 in the logit)
    with torch.no_grad():
        cls_emb = model.class_embeddings().float()
        logits = out["img_emb"] @ cls_emb.t() / model.log_tau.exp() + model.bias
    np.testing.assert_allclose(out["logits"].numpy(), logits.numpy(), atol=1e-5)
    assert "forward" not in model.clip.visual.__dict__, "nothing stays patched after the block"


def test_validation_scorer_leaves_the_training_model_as_it_was(tiny_model_untrained):
    model = tiny_model_untrained
    scorer = Scorer(model, device="cpu")  # what training validation builds around its live model
    assert scorer.precision == "fp32"
    types_before = [type(m) for m in model.modules()]
    scorer.predict(np.zeros((2, 3, 64, 64), np.uint8))
    assert [type(m) for m in model.modules()] == types_before
    assert "forward" not in model.clip.visual.__dict__


def test_linear_attention_is_the_same_maths_as_multihead_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    ours = precision_rule.LinearAttention.from_mha(mha).eval()
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False)[0]
        got = ours(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_int8_quantises_every_linear_of_the_image_tower_and_nothing_else(tiny_model_dir):
    scorer = Scorer.load(tiny_model_dir, device="cpu", precision="int8")
    visual, text = scorer.model.clip.visual, scorer.model.clip.transformer
    float_linears = [n for n, m in visual.named_modules() if type(m) in (torch.nn.Linear, torch.nn.MultiheadAttention)]
    assert float_linears == [], f"left in fp32: {float_linears}"
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    quantized = [m for m in visual.modules() if isinstance(m, dynamic)]
    assert len(quantized) == 4 * len(visual.transformer.resblocks)  # qkv, out, fc, proj per block
    assert not any(isinstance(m, dynamic) for m in text.modules()), "the text tower stays fp32"
    assert scorer.model.clip.visual.proj.dtype == torch.float32


def trained_scores(folder, precision: str, pixels: np.ndarray) -> np.ndarray:
    return Scorer.load(folder, device="cpu", precision=precision).predict(pixels).scores


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_int8_and_bf16_agree_with_fp32_on_a_trained_model(trained_tiny, precision):
    _, folder, _ = trained_tiny
    images, labels = synthetic.make_arrays(256, seed=7)
    pixels = np.stack([preprocess(im, 64) for im in images])
    fp32 = trained_scores(folder, "fp32", pixels)
    other = trained_scores(folder, precision, pixels)
    # top-3 of 8 labels (the synthetic taxonomy; top-10 would be every label), then mAP on the labels
    top = lambda s: np.argsort(-s, axis=1, kind="stable")[:, :3]  # noqa: E731
    agreement = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(top(fp32), top(other), strict=True)])
    assert agreement >= 0.95, agreement
    gap = abs(metrics.mean_average_precision(fp32, labels) - metrics.mean_average_precision(other, labels))
    assert gap <= 0.01, gap
    assert np.abs(fp32 - other).max() < 0.05
