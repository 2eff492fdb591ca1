"""The head registry and the three heads: shapes, the embedding in the text space, labels never seen in
training scored through the text tower, saved and loaded with identical scores, what trains in each stage,
and every new loss against a direct formula (gradcheck in float64)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mumic_core import checkpoint, metrics, synthetic
from mumic_core.heads import HEAD_NAMES, mkt_scores
from mumic_core.heads.clip_decoder import DecoderLayer
from mumic_core.heads.prompts import PromptContext
from mumic_core.images import preprocess
from mumic_core.losses import clip_decoder_loss, mkt_loss, multi_positive_infonce
from mumic_core.model import ModelConfig, ModelError, MuMIC
from mumic_core.taxonomy import Taxonomy
from mumic_core.training import OptimConfig, make_objective, make_optimizer, stage_schedule, train_step

SMALL_DECODER = {"dim": 64, "ffn": 128, "heads": 4}  # the defaults (768, 2048, 8) are tested for size only


def build(head: str, taxonomy=None, seed: int = 0, **kw) -> MuMIC:
    torch.manual_seed(seed)
    options = SMALL_DECODER if head == "clip_decoder" else {}
    return MuMIC.create(
        taxonomy or synthetic.taxonomy(), backbone="mumic-tiny", head=head, head_options=options, **kw
    )


def pixels(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module", params=HEAD_NAMES)
def model(request) -> MuMIC:
    return build(request.param).eval()


# ---- the registry and the one interface -------------------------------------------------------------------


def test_registry_holds_the_three_heads_and_refuses_unknown_heads_and_options():
    assert HEAD_NAMES == ("mumic", "clip_decoder", "mkt")
    with pytest.raises(ModelError, match="unknown head 'ml_decoder'"):
        ModelConfig(head="ml_decoder")
    with pytest.raises(ModelError, match=r"head mkt: unknown option\(s\) topk"):
        ModelConfig(head="mkt", head_options={"topk": 3})
    with pytest.raises(ModelError, match="option top_k must be a int"):
        ModelConfig(head="mkt", head_options={"top_k": "16"})
    with pytest.raises(ModelError, match="not a multiple of heads"):
        ModelConfig(head="clip_decoder", head_options={"dim": 100, "heads": 8})
    assert ModelConfig(head="clip_decoder").head_options.dim == 768  # ML-Decoder's defaults
    assert ModelConfig(head="mkt").head_options.top_k == 16


def test_every_head_scores_one_probability_per_label_and_a_normalised_embedding_in_the_text_space(model):
    with torch.no_grad():
        out = model(pixels())
    c, d = len(model.taxonomy), model.embed_dim
    assert out["probs"].shape == (4, c) and out["img_emb"].shape == (4, d)
    assert out["probs"].dtype == torch.float32
    assert torch.all((out["probs"] >= 0) & (out["probs"] <= 1))
    assert torch.allclose(out["img_emb"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert model.encode_texts(["a photo of a red object."]).shape == (1, d)  # the text tower's dimension


def test_default_sized_clip_decoder_has_ml_decoders_shapes():
    m = MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny", head="clip_decoder")
    head = m.head
    assert head.embed_tokens.weight.shape == (768, 128)  # ViT width 128 → d 768
    assert head.query.weight.shape == (768, 64)  # text embedding 64 → d
    assert head.decoder.linear1.weight.shape == (2048, 768) and head.decoder.cross_attn.num_heads == 8
    assert head.out_weight.shape == (768,) and head.out_bias.shape == ()  # one w and b for every class
    with torch.no_grad():
        assert m.eval()(pixels(2))["probs"].shape == (2, len(m.taxonomy))


def test_labels_never_seen_in_training_are_scored_through_the_text_tower(model):
    x = pixels(3)
    s = model.score_labels(x, ["a swimming pool", "sea view", "red"])
    assert s.shape == (3, 3) and torch.all((s >= 0) & (s <= 1))
    # the taxonomy's own labels scored zero-shot give the model's regular scores
    assert torch.allclose(model.score_labels(x, model.taxonomy.names), model.score(x), atol=1e-6)


def test_clip_decoder_queries_come_from_the_text_so_reordering_labels_reorders_scores():
    m = build("clip_decoder").eval()
    x = pixels(2)
    names = m.taxonomy.names
    forward, backward = m.score_labels(x, names), m.score_labels(x, names[::-1])
    torch.testing.assert_close(backward, forward.flip(1), rtol=1e-5, atol=1e-6)


def test_mkt_scores_are_the_mean_of_normalised_global_and_top_k_local_scores():
    g = torch.Generator().manual_seed(1)
    cls, patches, text = (
        torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 5), (2, 7, 5), (3, 5))
    )
    got = mkt_scores(cls, patches, text, top_k=3)
    for b in range(2):
        local = torch.tensor([sorted((patches[b] @ text[c]).tolist())[-3:] for c in range(3)]).mean(1)
        glob = torch.stack([cls[b] @ text[c] for c in range(3)])
        expected = (local / local.norm() + glob / glob.norm()) / 2
        torch.testing.assert_close(got[b], expected.to(got))
    assert torch.autograd.gradcheck(
        lambda a, p, t: mkt_scores(a, p, t, 3),
        (cls.requires_grad_(), patches.requires_grad_(), text.requires_grad_()),
    )


def test_mkt_probabilities_map_its_scores_onto_0_1_monotonically():
    m = build("mkt").eval()
    with torch.no_grad():
        out = m(pixels(3))
    torch.testing.assert_close(out["probs"], (out["scores"] + 1) / 2)
    assert torch.all(out["scores"].abs() <= 1 + 1e-6)


# ---- saved and loaded ---------------------------------------------------------------------------------------


def _perturb(model: MuMIC, seed: int) -> None:
    """Every trainable-looking weight moved, so a round trip that drops any of them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_save_and_load_round_trip_gives_identical_scores_and_embeddings(head, tmp_path):
    m = build(head, seed=2)
    m.begin_stage(m.head.stages[-1])  # mkt: prompt-tuned (its learned context is what scores labels)
    _perturb(m, 3)
    m.set_thresholds(np.linspace(0.2, 0.7, len(m.taxonomy)))
    checkpoint.save(m, tmp_path / head)
    cfg = json.loads((tmp_path / head / "config.json").read_text())
    assert cfg["model"]["head"] == head and cfg["format_version"] == checkpoint.FORMAT_VERSION
    loaded = checkpoint.load(tmp_path / head)
    assert loaded.config.head_options == m.config.head_options
    x = pixels(5, seed=4)
    m.eval()
    with torch.no_grad():
        a, b = m(x), loaded(x)
    assert torch.equal(a["probs"], b["probs"]) and torch.equal(a["img_emb"], b["img_emb"])
    assert torch.equal(
        m.score_labels(x, ["purple", "sea view"]), loaded.score_labels(x, ["purple", "sea view"])
    )
    assert torch.equal(loaded.thresholds, m.thresholds)


def test_a_model_saved_before_heads_existed_still_loads_as_the_mumic_head(tmp_path):
    m = build("mumic", seed=5)
    with torch.no_grad():
        m.bias.fill_(-0.4)
    folder = tmp_path / "v1"
    checkpoint.save(m, folder)
    # write the folder as format 1 wrote it: no head_options, τ and b at the top of the state dict
    state = {
        {"head.log_tau": "log_tau", "head.bias": "bias"}.get(k, k): v
        for k, v in load_file(folder / "model.safetensors").items()
    }
    save_file(state, folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["model"]["head_options"], cfg["weights_sha256"]
    cfg["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = checkpoint.load(folder)
    x = pixels(3)
    assert torch.equal(loaded.score(x), m.eval().score(x))
    assert float(loaded.bias.detach()) == pytest.approx(-0.4) and loaded.tau == pytest.approx(m.tau)


def test_hostile_or_mismatched_head_options_in_a_saved_config_are_one_line_errors(tmp_path):
    m = build("mkt")
    checkpoint.save(m, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    good = json.loads(path.read_text())
    for options, why in (
        ({"top_k": 10**9}, "outside"),
        ({"template": "no placeholder"}, "must contain"),
        ({"evil": 1}, "unknown option"),
        ("not an object", "an object"),
    ):
        cfg = json.loads(json.dumps(good))
        cfg["model"]["head_options"] = options
        path.write_text(json.dumps(cfg))
        with pytest.raises(ModelError, match=why) as e:
            checkpoint.load(tmp_path / "m")
        assert "\n" not in str(e.value)
    cfg = json.loads(json.dumps(good))
    cfg["model"]["head"] = "clip_decoder"  # the weights are an mkt head's
    cfg["model"]["head_options"] = {}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="do not match"):
        checkpoint.load(tmp_path / "m")


# ---- what trains, stage by stage ----------------------------------------------------------------------------


def _trainable(model: MuMIC) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_mkt_stage_1_trains_the_last_two_blocks_ln_post_and_projection_with_layer_decay():
    m = build("mkt")
    m.begin_stage(1)
    blocks = len(m.clip.visual.transformer.resblocks)  # 3 in mumic-tiny
    expected = {
        n for n, _ in m.named_parameters() if n.startswith(("clip.visual.ln_post", "clip.visual.proj"))
    }
    expected |= {
        n
        for n, _ in m.named_parameters()
        for i in (blocks - 2, blocks - 1)
        if n.startswith(f"clip.visual.transformer.resblocks.{i}.")
    }
    assert _trainable(m) == expected
    cfg = OptimConfig(lr_image=1e-3)
    lrs = {g["name"]: g["lr"] for g in make_optimizer(m, cfg).param_groups}
    assert lrs[f"block{blocks - 1}"] == pytest.approx(1e-3 * 0.65)
    assert lrs[f"block{blocks - 2}"] == pytest.approx(1e-3 * 0.65**2)
    assert lrs["post"] == pytest.approx(1e-3)


def test_mkt_stage_2_tunes_only_the_prompt_context_and_then_scores_through_it():
    m = build("mkt")
    before = m.eval().score(pixels(2))
    m.begin_stage(2)
    assert _trainable(m) == {"head.prompt.context"}
    assert m.config.head_options.prompt_tuned  # saved with the model
    assert {g["name"] for g in make_optimizer(m, OptimConfig()).param_groups} == {"prompt"}
    after = m.eval().score(pixels(2))
    assert not torch.allclose(before, after)  # the template is MKT's own now, not the taxonomy's


def test_prompt_context_before_tuning_encodes_exactly_as_the_text_tower_does():
    m = build("mkt").eval()
    prompt = PromptContext(m.clip, m.tokenizer, "There is a {} in the scene")
    names = ["red", "striped object", "a very " + "long " * 30 + "name"]  # the last one is truncated
    with torch.no_grad():
        got = prompt.encode(m.clip, names)
        expected = m.encode_texts([f"There is a {n} in the scene" for n in names])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mkt_distils_against_a_frozen_copy_of_the_starting_image_tower_outside_the_model():
    m = build("mkt")
    m.begin_stage(1)
    m.train()
    objective = make_objective(m, OptimConfig(), stage=1)
    teacher = objective.teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in teacher.parameters() for q in m.parameters())
    assert set(m.state_dict()) == set(build("mkt").state_dict())  # the teacher is not saved
    x, y = pixels(8, seed=6), torch.from_numpy(synthetic.make_arrays(8, seed=6)[1])
    optimizer = make_optimizer(m, OptimConfig(lr_image=1e-2, warmup_steps=0))
    train_step(m, optimizer, x, y, None, OptimConfig(), objective=objective)
    assert objective.parts["distill"] == pytest.approx(0.0, abs=1e-6)  # the student started as the teacher
    train_step(m, optimizer, x, y, None, OptimConfig(), objective=objective)
    assert objective.parts["distill"] > 1e-4
    with pytest.raises(ValueError, match="pass the objective"):
        # a per-step objective would copy the teacher anew
        train_step(m, optimizer, x, y, None, OptimConfig())


@pytest.mark.parametrize("head", HEAD_NAMES)
@pytest.mark.parametrize("mode", ["both", "image", "frozen"])
def test_every_parameter_that_trains_gets_a_gradient_in_every_stage(head, mode):
    """DDP (find_unused_parameters off) fails on a trainable parameter the loss does not reach."""
    m = build(head, train_mode=mode)
    x, y = pixels(4), torch.from_numpy(synthetic.make_arrays(4, seed=1)[1])
    objectives = {s: make_objective(m, OptimConfig(), stage=s) for s in m.head.stages}
    for stage in m.head.stages:
        m.begin_stage(stage)
        m.train()
        optimizer = make_optimizer(m, OptimConfig())
        train_step(m, optimizer, x, y, None, OptimConfig(), objective=objectives[stage])
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert trainable and not missing, (stage, missing)


def test_stage_schedule_runs_every_stage_in_order_or_only_the_one_asked_for():
    assert stage_schedule((1,), None, 3) == [1, 1, 1]
    assert stage_schedule((1, 2), None, 2, 1) == [1, 1, 2]
    assert stage_schedule((1, 2), 2, 2) == [2, 2]
    with pytest.raises(ValueError, match="not one of"):
        stage_schedule((1,), 2, 2)


def test_clip_decoder_layer_is_ml_decoders_layer_without_self_attention():
    torch.manual_seed(0)
    layer = DecoderLayer(8, 2, 16, dropout=0.0).eval()
    q, mem = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    x = layer.norm1(q + q)
    x = layer.norm2(x + layer.cross_attn(x, mem, mem)[0])
    x = layer.norm3(x + layer.linear2(F.relu(layer.linear1(x))))
    torch.testing.assert_close(layer(q, mem), x)


# ---- a trained toy case: search by text finds the images -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("head", HEAD_NAMES)
def test_after_a_little_training_text_search_ranks_images_of_the_label_first(head):
    """The embedding is in the text space: a query embedded by the text tower finds the label's images."""
    from mumic_core.training import fit

    images, y = synthetic.make_arrays(96, seed=11)
    x = np.stack([preprocess(im, 64) for im in images])
    m = build(head, seed=0, train_mode="both")
    fit(m, x, y, OptimConfig(epochs=6, batch_size=32, lr_image=3e-3, lr_text=3e-3, warmup_steps=3))
    with torch.no_grad():
        emb = m.eval()(x)["img_emb"].numpy()  # [N, D]
        query = np.stack([m.embed_query(name).numpy() for name in m.taxonomy.names])  # [C, D]
    # rank the images by their similarity to each label's text embedding
    search_ap = metrics.mean_average_precision(emb @ query.T, y)
    chance = metrics.mean_average_precision(np.random.default_rng(0).random(y.shape), y)
    print(f"\n{head}: text-to-image search mAP {search_ap:.3f} (random ranking {chance:.3f})")
    assert search_ap > chance + 0.1


# ---- the new losses against direct formulas, gradchecked in float64 -------------------------------------------


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "img": F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=-1),
        "text": F.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=-1),
        "labels": torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float64),
        "mask": torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float64),
    }


def _direct_infonce(img, text, labels, mask, tau):
    total, images = 0.0, 0
    for i in range(len(img)):
        known = [c for c in range(len(text)) if mask[i, c]]
        pos = [c for c in known if labels[i, c]]
        if not pos:
            continue
        denom = sum(torch.exp(img[i] @ text[c] / tau) for c in known)
        total = total - sum(torch.log(torch.exp(img[i] @ text[c] / tau) / denom) for c in pos) / len(pos)
        images += 1
    return total / images


def _direct_asl_sum(logits, labels, mask, clip=0.05):
    p = torch.sigmoid(logits)
    p_m = (p - clip).clamp(min=0)
    terms = labels * torch.log(p) + (1 - labels) * p_m**4 * torch.log(1 - p_m)  # γ+ = 0, γ− = 4
    return -(mask * terms).sum()


def test_masked_infonce_leaves_unknown_labels_out_of_the_softmax(case):
    got = multi_positive_infonce(case["img"], case["text"], case["labels"], 0.1, mask=case["mask"])
    torch.testing.assert_close(
        got, _direct_infonce(case["img"], case["text"], case["labels"], case["mask"], 0.1)
    )


def test_clip_decoder_loss_is_alpha_l_clip_plus_beta_asl_with_a_constant_focusing_weight(case):
    args = (case["logits"], case["img"], case["text"], case["labels"], case["mask"])
    loss, parts = clip_decoder_loss(*args, alpha=0.7, beta=1.3, tau=0.2)
    l_clip = _direct_infonce(case["img"], case["text"], case["labels"], case["mask"], 0.2)
    l_asl = _direct_asl_sum(case["logits"], case["labels"], case["mask"])
    torch.testing.assert_close(loss, 0.7 * l_clip + 1.3 * l_asl)
    torch.testing.assert_close(parts["clip"], l_clip)
    # without the detach, autograd's gradient is the numerical one
    assert torch.autograd.gradcheck(
        lambda z, e, t: clip_decoder_loss(
            z, e, t, case["labels"], case["mask"], 0.7, 1.3, 0.2, detach_weight=False
        )[0],
        (
            case["logits"].clone().requires_grad_(),
            case["img"].clone().requires_grad_(),
            case["text"].clone().requires_grad_(),
        ),
    )
    # with it (the default, as ASL's code), p_m^γ− is a constant: d/dz of −w·log(1 − p_m) = w·p(1 − p)/(1 − p_m)
    z = case["logits"].clone().requires_grad_()
    clip_decoder_loss(z, *args[1:], alpha=0.0, beta=1.0).__getitem__(0).backward()
    p = torch.sigmoid(case["logits"])
    p_m = (p - 0.05).clamp(min=0)
    neg = p_m**4 * p * (1 - p) / (1 - p_m) * (p > 0.05)
    expected = case["mask"] * (case["labels"] * -(1 - p) + (1 - case["labels"]) * neg)
    torch.testing.assert_close(z.grad, expected)


def _direct_rank(scores, labels, mask, margin=1.0):
    per_image = []
    for i in range(len(scores)):
        pos = [c for c in range(scores.shape[1]) if mask[i, c] and labels[i, c]]
        neg = [c for c in range(scores.shape[1]) if mask[i, c] and not labels[i, c]]
        if not pos:
            continue
        hinges = [torch.clamp(margin - scores[i, p] + scores[i, n], min=0) for p in pos for n in neg]
        violating = sum(1 for h in hinges if h > 0)
        per_image.append(sum(hinges) / max(violating, 1))
    return sum(per_image) / len(per_image)


def test_mkt_loss_is_the_ranking_loss_plus_weighted_l1_distillation(case):
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(3, 4, generator=g, dtype=torch.float64) * 2 - 1  # MKT scores lie in [-1, 1]
    student, teacher = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    loss, parts = mkt_loss(scores, case["labels"], case["mask"], student, teacher, distill_weight=0.5)
    rank = _direct_rank(scores, case["labels"], case["mask"])
    torch.testing.assert_close(parts["rank"], rank)
    torch.testing.assert_close(loss, rank + 0.5 * (student - teacher).abs().mean())
    stage_2, parts_2 = mkt_loss(scores, case["labels"], case["mask"])
    torch.testing.assert_close(stage_2, rank)
    assert set(parts_2) == {"rank"}
    assert torch.autograd.gradcheck(
        lambda s, st: mkt_loss(s, case["labels"], case["mask"], st, teacher, 0.5)[0],
        (scores.clone().requires_grad_(), student.clone().requires_grad_()),
    )


def test_unknown_labels_weigh_nothing_in_the_heads_losses(case):
    # an unknown entry may hold any value: the losses do not change
    logits2, labels2 = case["logits"].clone(), case["labels"].clone()
    unknown = case["mask"] == 0
    logits2[unknown], labels2[unknown] = 9.0, 1 - labels2[unknown]
    a = clip_decoder_loss(case["logits"], case["img"], case["text"], case["labels"], case["mask"])[0]
    b = clip_decoder_loss(logits2, case["img"], case["text"], labels2, case["mask"])[0]
    torch.testing.assert_close(a, b)
    ra = mkt_loss(case["logits"].tanh(), case["labels"], case["mask"])[0]
    rb = mkt_loss(logits2.tanh(), labels2, case["mask"])[0]
    torch.testing.assert_close(ra, rb)


def test_taxonomy_with_other_templates_keeps_mkt_stage_1_on_the_taxonomys_prompts():
    taxonomy = Taxonomy.from_names(["red", "green"])
    m = build("mkt", taxonomy=taxonomy).eval()
    with torch.no_grad():
        torch.testing.assert_close(m.class_embeddings(), m.prompt_embeddings(taxonomy))


def test_train_config_sets_head_options_by_prefix_and_refuses_stages_a_head_lacks():
    from pydantic import ValidationError

    from pipelines.train.config import TrainConfig

    cfg = TrainConfig(head="clip_decoder", decoder_alpha=0.5, decoder_tau=0.2, mkt_top_k=4)
    options = cfg.model_options()["head_options"]
    assert (options.alpha, options.beta, options.tau, options.dim) == (0.5, 1.0, 0.2, 768)
    assert TrainConfig(head="mkt", mkt_top_k=4).model_options()["head_options"].top_k == 4
    assert TrainConfig(head="mkt", epochs=2, stage2_epochs=1).stages() == [1, 1, 2]
    assert TrainConfig(head="mkt", stage=1, epochs=2).stages() == [1, 1]
    with pytest.raises(ValidationError, match="not one of this head's stages"):
        TrainConfig(head="mumic", stage=2)
    with pytest.raises(ValidationError, match="name it with --init"):
        TrainConfig(head="mkt", stage=2)
