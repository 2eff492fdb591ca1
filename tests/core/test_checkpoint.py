"""Saved models: safetensors + config.json, local and on S3; round trips give identical scores."""

import json

import pytest
import torch

from mumic_core import checkpoint
from mumic_core.model import ModelError


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=g)


def test_checkpoint_round_trip_gives_identical_scores_and_embeddings(tmp_path, trained_tiny):
    model, _, _ = trained_tiny
    model.set_thresholds([0.3 + 0.05 * i for i in range(len(model.taxonomy))])
    checkpoint.save(model, tmp_path / "m")
    loaded = checkpoint.load(tmp_path / "m")
    x = batch()
    a, b = model.eval()(x), loaded(x)
    assert torch.equal(a["probs"], b["probs"])
    assert torch.equal(a["img_emb"], b["img_emb"])
    assert torch.equal(loaded.thresholds, model.thresholds)
    assert loaded.taxonomy == model.taxonomy
    assert loaded.tau == pytest.approx(model.tau)


def test_saved_folder_holds_safetensors_and_a_self_describing_config(tmp_path, trained_tiny):
    model, _, _ = trained_tiny
    checkpoint.save(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model"]["backbone"] == "mumic-tiny"
    assert cfg["model"]["arch"]["vision_cfg"]["image_size"] == 64  # rebuildable without the JSON file
    assert cfg["taxonomy"]["labels"][0]["name"] == model.taxonomy.names[0]
    assert cfg["taxonomy_sha256"] == model.taxonomy.sha256
    assert len(cfg["thresholds"]) == len(model.taxonomy)
    assert cfg["preprocessing"]["image_size"] == 64
    assert cfg["tau"] == pytest.approx(model.tau)
    assert len(cfg["weights_sha256"]) == 64
    assert cfg["mumic_version"]
    # the weights file is safetensors (8-byte header length, then JSON), not a pickle
    raw = (tmp_path / "m" / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    json.loads(raw[8 : 8 + n])


def test_checkpoint_round_trip_through_s3(s3_bucket, trained_tiny):
    model, _, _ = trained_tiny
    uri = f"s3://{s3_bucket}/models/tiny/v1"
    checkpoint.save(model, uri)
    loaded = checkpoint.load(uri)
    x = batch(1)
    assert torch.equal(model.eval().score(x), loaded.score(x))


def test_loading_a_missing_or_partial_folder_is_a_clear_error(tmp_path, trained_tiny):
    with pytest.raises(ModelError, match="no saved model"):
        checkpoint.load(tmp_path / "nothing-here")
    model, _, _ = trained_tiny
    checkpoint.save(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="has no model.safetensors"):
        checkpoint.load(tmp_path / "m")


# ---- hostile model folders: a one-line ModelError, nothing allocated, nothing executed -------------------

import hashlib  # noqa: E402
import pickle  # noqa: E402  (only to build a hostile file; the code under test must never unpickle it)
import sys  # noqa: E402

from mumic_core import model as model_mod  # noqa: E402


@pytest.fixture
def folder(tmp_path, tiny_model_untrained):
    checkpoint.save(tiny_model_untrained, tmp_path / "m")
    return tmp_path / "m"


def edit_config(folder, change) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def refused(folder, match: str) -> str:
    for call in (checkpoint.read_config, checkpoint.load):
        with pytest.raises(ModelError, match=match) as info:
            call(folder)
        assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def no_layers(monkeypatch):
    """Fail the test if a CLIP is built: refusals must come before anything is allocated."""

    def built(*args, **kwargs):
        raise AssertionError("a CLIP was built")

    monkeypatch.setattr(model_mod.open_clip_module(), "CLIP", built)
    monkeypatch.setattr(model_mod.open_clip_module(), "CustomTextCLIP", built)


def test_unknown_top_level_fields_are_refused_by_name(folder, no_layers):
    edit_config(folder, lambda c: c.update(evil_hook="x", pyfunc_loader="y"))
    message = refused(folder, r"unknown field\(s\) 'evil_hook', 'pyfunc_loader'")
    assert str(folder) in message


def test_unknown_fields_in_model_are_refused_by_name_instead_of_dropped(folder, no_layers):
    edit_config(folder, lambda c: c["model"].update(quantize="int2", trust_remote_code=True))
    refused(folder, r"unknown model field\(s\) 'quantize', 'trust_remote_code'")
    with pytest.raises(ModelError, match="unknown model field"):
        model_mod.ModelConfig.from_dict({"backbone": "mumic-tiny", "quantize": "int2"})


def test_unknown_preprocessing_fields_and_a_bad_weights_sha256_are_refused(folder, no_layers):
    edit_config(folder, lambda c: c["preprocessing"].update(run="rm -rf /"))
    refused(folder, "'preprocessing' must be an object of image_size, mean, std, resize_mode, input")
    edit_config(folder, lambda c: (c["preprocessing"].pop("run"), c.update(weights_sha256="abc")))
    refused(folder, "weights_sha256 must be 64 lowercase hex digits")


def test_extra_keys_that_save_may_write_still_load(tmp_path, tiny_model_untrained):
    checkpoint.save(tiny_model_untrained, tmp_path / "m", extra={"epoch": 3, "name": "shop", "version": "7"})
    assert checkpoint.read_config(tmp_path / "m")["epoch"] == 3
    checkpoint.load(tmp_path / "m")
    with pytest.raises(ModelError, match="cannot hold surprise"):
        checkpoint.save(tiny_model_untrained, tmp_path / "n", extra={"surprise": 1})


@pytest.mark.parametrize(
    "where, key, value",
    [
        ("vision_cfg", "width", 10**6),
        ("vision_cfg", "layers", 10**4),
        ("vision_cfg", "image_size", 10**5),
        ("vision_cfg", "patch_size", 0),
        ("", "embed_dim", 10**6),
        ("text_cfg", "context_length", 10**6),
        ("text_cfg", "vocab_size", 10**9),
        ("text_cfg", "heads", -2),
        ("text_cfg", "layers", "12"),
        ("text_cfg", "width", True),
        ("vision_cfg", "image_size", [64, 10**6]),
        ("vision_cfg", "mlp_ratio", float("inf")),
    ],
)
def test_absurd_architecture_sizes_are_refused_before_anything_is_allocated(
    folder, no_layers, where, key, value
):
    def change(cfg):
        arch = cfg["model"]["arch"]
        (arch[where] if where else arch)[key] = value

    edit_config(folder, change)
    name = f"{where}.{key}" if where else key
    refused(folder, rf"model\.arch: {name} = .* is outside 1\.\.\d+")


def test_sizes_each_within_bounds_but_absurd_together_are_refused(folder, no_layers):
    def change(cfg):
        cfg["model"]["arch"]["vision_cfg"].update(width=16_384, layers=256, head_width=64)

    edit_config(folder, change)
    refused(folder, r"about .* parameters, above the limit")


def test_build_clip_and_a_backbone_json_file_are_bounded_too(tmp_path, no_layers):
    arch = model_mod.resolve_arch("mumic-tiny")
    arch["text_cfg"]["context_length"] = 10**6
    with pytest.raises(ModelError, match=r"text_cfg\.context_length = 1000000 is outside"):
        model_mod.build_clip(arch)
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(ModelError, match=r"arch\.json: text_cfg\.context_length"):
        model_mod.resolve_arch(str(tmp_path / "arch.json"))
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ModelError, match="is not JSON"):
        model_mod.resolve_arch(str(tmp_path / "bad.json"))


def test_every_open_clip_architecture_is_within_the_bounds():
    open_clip = model_mod.open_clip_module()
    for name in open_clip.list_models():
        model_mod.check_arch(open_clip.get_model_config(name), name)


def test_an_architecture_field_open_clip_does_not_know_is_a_model_error():
    arch = model_mod.resolve_arch("mumic-tiny")
    arch["vision_cfg"]["exec_on_load"] = "import os"
    with pytest.raises(ModelError, match="architecture not understood by open_clip"):
        model_mod.build_clip(arch)


def flip_last_byte(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # inside the last tensor's data: still a valid safetensors file
    path.write_bytes(bytes(raw))


def test_weights_whose_sha256_differs_from_the_config_are_refused_on_load(folder):
    flip_last_byte(folder / "model.safetensors")
    with pytest.raises(
        ModelError, match=r"model\.safetensors has sha256 [0-9a-f]{16}\.\.\., config\.json says"
    ):
        checkpoint.load(folder)
    edit_config(folder, lambda c: c.pop("weights_sha256"))  # an older folder: nothing to check against
    checkpoint.load(folder)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{not json", r"is not JSON: Expecting property name .* at line 1 column 2"),
        (b'{"model": "caf\xe9"}', r"is not UTF-8 text \(byte 0xe9 at offset 14\)"),
        (b"[1, 2, 3]", "must hold a JSON object, not list"),
        (b"[" * 200_000 + b"]" * 200_000, r"is not a usable JSON document \(RecursionError\)"),
        (b'{"tau": ' + b"9" * 10_000 + b"}", r"is not a usable JSON document \(ValueError\)"),
        (b"", r"is not JSON: Expecting value at line 1 column 1"),
    ],
    ids=["not-json", "latin-1", "array", "nested", "huge-int", "empty"],
)
def test_a_config_that_is_not_a_utf8_json_object_is_a_model_error(folder, content, match):
    (folder / "config.json").write_bytes(content)
    refused(folder, match)


def test_a_huge_config_is_refused_after_reading_only_the_limit(folder, monkeypatch):
    (folder / "config.json").write_bytes(b"{" + b" " * checkpoint.MAX_CONFIG_BYTES + b"}")
    reads = []
    real_open = checkpoint.fsspec.open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

    class SpyOpen:
        def __init__(self, *a, **k):
            self.cm = real_open(*a, **k)

        def __enter__(self):
            return Spy(self.cm.__enter__())

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    monkeypatch.setattr(checkpoint.fsspec, "open", SpyOpen)
    refused(folder, "is over 16 MiB: not a model config")
    assert reads and all(0 < n <= checkpoint.MAX_CONFIG_BYTES + 1 for n in reads)


class _Payload:
    """Unpickling this creates the marker file: proof that something ran code from the artifact."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_weights_that_are_not_safetensors_are_refused_without_unpickling(folder, tmp_path, kind):
    marker = tmp_path / "PWNED"
    weights = folder / "model.safetensors"
    if kind == "pickle":
        weights.write_bytes(pickle.dumps({"clip.visual.conv1.weight": _Payload(marker)}))
    else:
        torch.save({"clip.visual.conv1.weight": _Payload(marker)}, weights)
    assert not marker.exists()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    edit_config(folder, lambda c: c.update(weights_sha256=digest))  # a consistent, hostile folder
    with pytest.raises(ModelError, match=r"model\.safetensors is not a safetensors file") as info:
        checkpoint.load(folder)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_loading_reads_only_the_config_and_the_weights_and_runs_no_code_in_the_folder(
    folder, tmp_path, monkeypatch
):
    marker = tmp_path / "PWNED"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("pyfunc_model.py", "__init__.py", "model_code.py", "conftest.py"):
        (folder / name).write_text(code)
    (folder / "python_model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: pyfunc_model\n")
    opened = []
    real_open = checkpoint.fsspec.open

    def spy(path, *args, **kwargs):
        opened.append(str(path).rsplit("/", 1)[-1])
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.fsspec, "open", spy)
    modules_before = set(sys.modules)
    loaded = checkpoint.load(folder)
    assert sorted(set(opened)) == ["config.json", "model.safetensors"]
    assert not marker.exists()
    assert not {m for m in set(sys.modules) - modules_before if "pyfunc_model" in m or "model_code" in m}
    assert loaded.score(batch()).shape == (5, len(loaded.taxonomy))


def test_weights_of_the_wrong_shape_are_a_model_error(folder, tiny_model_untrained):
    from safetensors.torch import save as st_save

    state = {k: v.clone() for k, v in tiny_model_untrained.state_dict().items()}
    state["clip.visual.conv1.weight"] = torch.zeros(1, 2, 3)
    (folder / "model.safetensors").write_bytes(st_save(state))
    edit_config(folder, lambda c: c.pop("weights_sha256"))
    with pytest.raises(ModelError, match="saved weights do not fit the config: .*size mismatch"):
        checkpoint.load(folder)


# ---- loading without random init: the same model, bit for bit, for every head ---------------------------

import numpy as np  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402

from mumic_core import synthetic  # noqa: E402
from mumic_core.heads import HEAD_NAMES  # noqa: E402
from mumic_core.model import ModelConfig, MuMIC, NoRandomInit  # noqa: E402
from mumic_core.scoring import Scorer  # noqa: E402
from mumic_core.taxonomy import Taxonomy  # noqa: E402

SMALL_DECODER = {"dim": 64, "ffn": 128, "heads": 4}


def head_model(head: str, stage: int = 1, seed: int = 3) -> MuMIC:
    torch.manual_seed(seed)
    options = SMALL_DECODER if head == "clip_decoder" else {}
    model = MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny", head=head, head_options=options)
    if stage != 1:
        model.begin_stage(stage)  # mkt stage 2: classes scored through the learned prompt context
    model.set_thresholds([0.2 + 0.07 * i for i in range(len(model.taxonomy))])
    return model.eval()


def loaded_as_before(folder) -> MuMIC:
    """How a folder was loaded before NoRandomInit: a randomly initialised model, the weights copied in."""
    cfg = checkpoint.read_config(folder)
    model = MuMIC(ModelConfig.from_dict(cfg["model"]), Taxonomy.from_dict(cfg["taxonomy"]))
    model.load_state_dict(checkpoint.weights_only(st_load((folder / checkpoint.WEIGHTS).read_bytes())))
    model.set_train_mode(model.config.train_mode)
    return model.eval()


@pytest.mark.parametrize(("head", "stage"), [*((h, 1) for h in HEAD_NAMES), ("mkt", 2)])
def test_a_load_without_random_init_scores_and_embeds_exactly_as_the_saved_model(tmp_path, head, stage):
    model = head_model(head, stage)
    checkpoint.save(model, tmp_path / "m")
    loaded, before = checkpoint.load(tmp_path / "m"), loaded_as_before(tmp_path / "m")
    for other in (loaded, before):
        assert other.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key
    # the buffers no file holds (the text tower's causal mask, the pixel statistics) are built as before
    persistent = model.state_dict().keys()
    for (name, buf), (_, again) in zip(model.named_buffers(), loaded.named_buffers(), strict=True):
        if name not in persistent:
            assert torch.equal(buf, again), name
    x = batch(2).numpy()
    a, b = Scorer(model).predict(x), Scorer.load(tmp_path / "m", device="cpu").predict(x)
    assert np.array_equal(a.scores, b.scores)  # atol 0
    assert np.array_equal(a.embeddings, b.embeddings)
    assert np.array_equal(a.thresholds, b.thresholds)
    assert torch.equal(model.class_embeddings(), loaded.class_embeddings())


def test_a_loaded_model_owns_writable_weights_that_train_and_save_again(tmp_path):
    model = head_model("mumic")
    checkpoint.save(model, tmp_path / "m")
    one, two = checkpoint.load(tmp_path / "m"), checkpoint.load(tmp_path / "m")
    weight = one.clip.visual.conv1.weight
    assert weight.data_ptr() != two.clip.visual.conv1.weight.data_ptr()
    assert weight.requires_grad  # train_mode "both": as a fresh model
    with torch.no_grad():
        weight.add_(1.0)  # an optimizer step, in place
    assert torch.equal(two.clip.visual.conv1.weight, model.clip.visual.conv1.weight)
    checkpoint.save(one, tmp_path / "again")
    assert torch.equal(checkpoint.load(tmp_path / "again").clip.visual.conv1.weight, weight)


def test_weights_saved_in_another_dtype_load_cast_to_the_models_as_a_copy_would(folder, tiny_model_untrained):
    from safetensors.torch import save as st_save

    state = {k: v.half() if v.is_floating_point() else v for k, v in tiny_model_untrained.state_dict().items()}
    (folder / "model.safetensors").write_bytes(st_save({k: v.contiguous() for k, v in state.items()}))
    edit_config(folder, lambda c: c.pop("weights_sha256"))
    loaded = checkpoint.load(folder)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.clip.visual.conv1.weight, state["clip.visual.conv1.weight"].float())


def test_tied_weights_stay_tied_through_a_load():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight

    source, target = Tied(), Tied()
    checkpoint._load_state(target, {k: v.clone() for k, v in source.state_dict().items()})
    assert target.b.weight is target.a.weight
    assert torch.equal(target.a.weight, source.a.weight)


def test_no_random_init_is_only_for_the_load_and_fresh_models_still_initialise():
    with NoRandomInit():
        skipped = torch.nn.init.normal_(torch.zeros(64), std=1.0)
    assert not skipped.any()  # the fill was left out
    a, b = head_model("clip_decoder", seed=1), head_model("clip_decoder", seed=2)  # what `mumic train` builds
    for model in (a, b):
        weights = model.head.decoder.state_dict()
        assert all(torch.isfinite(w).all() for w in weights.values())
    assert not torch.equal(a.clip.visual.conv1.weight, b.clip.visual.conv1.weight)  # seeded, random init
    assert not torch.equal(a.head.embed_tokens.weight, b.head.embed_tokens.weight)
    assert 0.005 < float(a.clip.visual.conv1.weight.std()) < 1.0  # drawn, not left unfilled


# ---- the class embeddings saved with the weights: a load runs no prompt through the text tower -----------


def _count_text_tower(model: MuMIC) -> list[int]:
    """How often the head makes class embeddings from now on (through the text tower, each time)."""
    calls = [0]
    encode = model.head.encode_classes

    def counting(*args, **kwargs):
        calls[0] += 1
        return encode(*args, **kwargs)

    model.head.encode_classes = counting
    return calls


@pytest.mark.parametrize(("head", "stage"), [*((h, 1) for h in HEAD_NAMES), ("mkt", 2)])
def test_a_loaded_model_scores_with_its_saved_class_embeddings_without_the_text_tower(tmp_path, head, stage):
    model = head_model(head, stage)
    checkpoint.save(model, tmp_path / "m")
    fresh = checkpoint.class_embeddings(model)  # as a Scorer makes them, from the text tower
    scorer = Scorer(checkpoint.load(tmp_path / "m"), device="cpu", precision="fp32")
    calls = _count_text_tower(scorer.model)
    x = np.random.default_rng(1).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    scores = scorer.predict(x).scores
    assert calls[0] == 0  # the saved embeddings were served: no prompt went through the text tower
    assert torch.equal(scorer.model.class_embeddings(), fresh)
    with torch.no_grad():
        assert np.array_equal(scores, model(torch.from_numpy(x))["probs"].numpy())
    scorer.predict(x, labels=["purple", "sea view"])  # labels outside the taxonomy: the text tower, as before
    assert calls[0] >= 1


def test_saved_class_embeddings_are_not_served_once_the_config_says_another_taxonomy(tmp_path):
    model = head_model("mumic")
    checkpoint.save(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / checkpoint.CONFIG).read_text())
    cfg["taxonomy"]["labels"][0]["name"] = "sea view"  # edited after saving: same weights, another label
    (tmp_path / "m" / checkpoint.CONFIG).write_text(json.dumps(cfg))
    loaded = checkpoint.load(tmp_path / "m")
    calls = _count_text_tower(loaded)
    with torch.no_grad():
        emb = loaded.class_embeddings()
    assert calls[0] == 1 and loaded.taxonomy.names[0] == "sea view"
    assert torch.equal(emb, checkpoint.class_embeddings(loaded))
    assert not torch.equal(emb, checkpoint.class_embeddings(model))
