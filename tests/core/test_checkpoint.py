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
