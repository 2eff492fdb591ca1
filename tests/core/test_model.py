"""The MuMIC model: scoring, zero-shot, caching of class embeddings, train modes, pretrained loading."""

import json
import math

import numpy as np
import pytest
import torch

from mumic_core import synthetic
from mumic_core.model import ModelError, MuMIC, resolve_arch
from mumic_core.taxonomy import Taxonomy


@pytest.fixture
def model(taxonomy):
    torch.manual_seed(0)
    return MuMIC.create(taxonomy, backbone="mumic-tiny").eval()


def pixels(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_tiny_backbone_is_registered_with_open_clip():
    from mumic_core.model import open_clip_module

    assert "mumic-tiny" in open_clip_module().list_models()
    assert resolve_arch("mumic-tiny")["vision_cfg"]["image_size"] == 64


def test_model_scores_one_probability_per_label_and_normalised_embeddings(model, taxonomy):
    with torch.no_grad():
        out = model(pixels())
    assert out["probs"].shape == (4, len(taxonomy))
    assert torch.all((out["probs"] > 0) & (out["probs"] < 1))
    assert torch.allclose(out["img_emb"].norm(dim=-1), torch.ones(4), atol=1e-5)
    # tempered sigmoid: p = sigmoid(s / tau + b)
    expected = torch.sigmoid(out["sim"] / model.tau + float(model.bias))
    assert torch.allclose(out["probs"], expected, atol=1e-6)


def test_uint8_and_prenormalised_float_inputs_give_the_same_scores(model):
    x = pixels(2)
    xf = (x.float() / 255 - model.pixel_mean) / model.pixel_std
    assert torch.allclose(model.score(x), model.score(xf), atol=1e-6)


def test_zero_shot_scores_any_label_strings_without_retraining(model, taxonomy):
    x = pixels(3)
    s = model.score_labels(x, ["a swimming pool", "sea view", "red"])
    assert s.shape == (3, 3)
    assert torch.all((s > 0) & (s < 1))
    # the taxonomy's own labels scored zero-shot equal the model's regular scores
    assert torch.allclose(model.score_labels(x, taxonomy.names), model.score(x), atol=1e-6)
    with pytest.raises(ModelError):
        model.score_labels(x, [])


def test_class_embeddings_are_cached_until_text_tower_or_taxonomy_changes(model, taxonomy):
    with torch.no_grad():
        a = model.class_embeddings()
        b = model.class_embeddings()
        assert a is b  # cached
        other = model.class_embeddings(Taxonomy.from_names(["x", "y"]))
        assert other.shape[0] == 2
        p = model.text_parameters()[0]
        p.add_(0.01)  # an in-place update, as optimizer.step() does
        c = model.class_embeddings()
    assert c is not a
    assert not torch.allclose(a, c)


def test_class_embeddings_carry_gradients_while_the_text_tower_trains(model):
    model.train()
    emb = model.class_embeddings()
    assert emb.requires_grad
    emb.sum().backward()
    assert any(p.grad is not None for p in model.text_parameters())


def test_class_embedding_is_mean_of_normalised_prompt_embeddings(model, taxonomy):
    with torch.no_grad():
        label = taxonomy.labels[0]
        prompts = taxonomy.prompts_for(label)
        e = model.encode_texts(prompts)
        expected = torch.nn.functional.normalize(e.mean(0), dim=-1)
        assert torch.allclose(model.class_embeddings()[0], expected, atol=1e-5)


def test_train_modes_choose_what_trains(model):
    model.set_train_mode("image")
    assert all(p.requires_grad for p in model.image_parameters())
    assert not any(p.requires_grad for p in model.text_parameters())
    model.set_train_mode("frozen")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(model.log_tau), id(model.bias)}
    model.set_train_mode("both")
    assert all(p.requires_grad for p in model.text_parameters())
    with pytest.raises(ModelError):
        model.set_train_mode("everything")


def test_tau_initialised_from_checkpoint_logit_scale(taxonomy):
    m = MuMIC.create(taxonomy, backbone="mumic-tiny")
    assert math.isclose(m.tau, 1 / math.exp(float(m.clip.logit_scale)), rel_tol=1e-5)
    fixed = MuMIC.create(taxonomy, backbone="mumic-tiny", init_tau=0.02, learn_tau=False, use_bias=False)
    assert math.isclose(fixed.tau, 0.02, rel_tol=1e-5)
    assert not fixed.log_tau.requires_grad and not fixed.bias.requires_grad


def test_backbone_from_custom_architecture_json(tmp_path, taxonomy):
    arch = resolve_arch("mumic-tiny")
    arch["vision_cfg"]["image_size"] = 32
    arch["vision_cfg"]["layers"] = 1
    p = tmp_path / "my-arch.json"
    p.write_text(json.dumps(arch))
    m = MuMIC.create(taxonomy, backbone=str(p))
    assert m.config.image_size == 32
    assert m.score(pixels(2, size=32)).shape == (2, len(taxonomy))


def test_unknown_backbone_and_unknown_pretrained_tag_are_clear_errors(taxonomy):
    with pytest.raises(ModelError, match="unknown backbone"):
        MuMIC.create(taxonomy, backbone="no-such-model")
    with pytest.raises(ModelError, match="unknown pretrained tag"):
        MuMIC.create(taxonomy, backbone="mumic-tiny", pretrained="laion9000")
    with pytest.raises(ModelError, match="not found"):
        MuMIC.create(taxonomy, backbone="mumic-tiny", pretrained="/nonexistent/ckpt.safetensors")


def _reference_clip_state():
    torch.manual_seed(123)
    ref = MuMIC.create(Taxonomy.from_names(["a"]), backbone="mumic-tiny")
    with torch.no_grad():
        ref.clip.logit_scale.fill_(math.log(100.0))  # a "pretrained" CLIP has tau = 0.01
    return {k: v.clone() for k, v in ref.clip.state_dict().items()}


def test_pretrained_weights_load_from_safetensors_and_torch_files(tmp_path, taxonomy):
    from safetensors.torch import save_file

    state = _reference_clip_state()
    st = tmp_path / "clip.safetensors"
    save_file(state, st)
    pt = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)
    for path in (st, pt):
        m = MuMIC.create(taxonomy, backbone="mumic-tiny", pretrained=str(path))
        for k, v in m.clip.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert math.isclose(m.tau, 0.01, rel_tol=1e-4)  # tau from the checkpoint's logit scale


def test_pretrained_torch_file_with_pickled_objects_is_refused(tmp_path, taxonomy):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    p = tmp_path / "evil.pt"
    torch.save({"state_dict": _reference_clip_state(), "x": Evil()}, p)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        MuMIC.create(taxonomy, backbone="mumic-tiny", pretrained=str(p))


def test_pretrained_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path, taxonomy):
    from safetensors.torch import save_file

    save_file({"unrelated.weight": torch.zeros(3)}, tmp_path / "x.safetensors")
    with pytest.raises(ModelError, match="does not fit"):
        MuMIC.create(taxonomy, backbone="mumic-tiny", pretrained=str(tmp_path / "x.safetensors"))


def test_pretrained_weights_load_from_s3(s3_bucket, taxonomy):
    import fsspec
    from safetensors.torch import save

    state = _reference_clip_state()
    uri = f"s3://{s3_bucket}/backbones/clip.safetensors"
    with fsspec.open(uri, "wb") as f:
        f.write(save(state))
    m = MuMIC.create(taxonomy, backbone="mumic-tiny", pretrained=uri)
    assert torch.equal(m.clip.state_dict()["text_projection"], state["text_projection"])


def test_tiny_model_learns_generated_labels_to_map_at_least_0_9(trained_tiny):
    _, _, report = trained_tiny
    print(
        f"\ntiny model: {report['train_epochs']} epochs in {report['train_seconds']:.1f} s on {torch.get_num_threads()} "
        f"threads; held-out generated images: mAP={report['map']:.4f} GAP@10={report['gap_at_10']:.4f}"
    )
    print("per-class AP:", {k: round(v, 3) for k, v in report["per_class_ap"].items()})
    assert report["map"] >= 0.9


def test_trained_model_ranks_images_with_a_label_above_images_without(trained_tiny):
    model, _, _ = trained_tiny
    from mumic_core.images import preprocess

    imgs, y = synthetic.make_arrays(64, seed=7)
    x = np.stack([preprocess(im, model.config.image_size) for im in imgs])
    j = synthetic.LABELS.index("red")
    s = model.score_labels(x, ["red"])[:, 0].numpy()
    assert s[y[:, j] == 1].mean() > s[y[:, j] == 0].mean() + 0.3


def test_a_process_that_only_reads_configs_never_imports_open_clip(tiny_model_untrained, tmp_path):
    """open_clip (with torchvision and torch._dynamo, ~2 s of CPU) is imported on first use: a retag driver
    reads and checks the model's config, and never builds one."""
    import subprocess
    import sys

    from mumic_core import checkpoint

    checkpoint.save(tiny_model_untrained, tmp_path / "m")
    code = (
        "import sys; from mumic_core import checkpoint; import pipelines.retag.run; "
        f"checkpoint.read_config({str(tmp_path / 'm')!r}); "
        "print(sorted(m for m in ('open_clip', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
