"""What a training step does once instead of every step, and what it decides for a GPU (checked here on
the CPU, from the decision functions): the prompt tokens, the class-embedding cache under autocast, the
loss read once per epoch, the data loading, AdamW's kernel and TF32."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs import cli
from mumic_core import synthetic
from mumic_core.model import MuMIC
from mumic_core.taxonomy import Taxonomy
from mumic_core.training import (
    LossTally,
    OptimConfig,
    adamw_options,
    allows_tf32,
    make_objective,
    make_optimizer,
    take_step,
    train_step,
    use_fast_float32,
)
from pipelines.train.config import TrainConfig
from pipelines.train.worker import loader_options, validation_prefetch

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


class CountingTokenizer:
    """The model's tokenizer, counting calls (of itself, and of `encode`, which MKT's prompt uses)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.encodes = tokenizer, 0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def encode(self, *args, **kwargs):
        self.encodes += 1
        return self.tokenizer.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def batches(n_labels: int, sizes=(8, 8, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    for b in sizes:
        pixels = torch.randint(0, 256, (b, 3, 64, 64), dtype=torch.uint8, generator=g)
        yield pixels, (torch.rand(b, n_labels, generator=g) < 0.3).float()


def tiny(taxonomy=None, **kw) -> MuMIC:
    torch.manual_seed(0)
    return MuMIC.create(taxonomy or synthetic.taxonomy(), backbone="mumic-tiny", **kw)


def tokenising_every_call(model: MuMIC):
    """prompt_embeddings as it was before the token cache: the tokenizer on every call."""

    def prompt_embeddings(taxonomy: Taxonomy) -> torch.Tensor:
        prompts = [taxonomy.prompts_for(label) for label in taxonomy.labels]
        emb = model.encode_texts([p for ps in prompts for p in ps])
        owner = torch.tensor([i for i, ps in enumerate(prompts) for _ in ps])
        summed = torch.zeros(len(prompts), emb.shape[1]).index_add(0, owner, emb)
        return F.normalize(summed, dim=-1)

    return prompt_embeddings


def test_both_mode_tokenises_the_prompts_once_and_trains_exactly_as_before():
    taxonomy = Taxonomy.from_names(synthetic.LABELS, templates=("a photo of a {}.", "a {} in a picture."))
    cached, before = tiny(taxonomy), tiny(taxonomy)
    before.prompt_embeddings = tokenising_every_call(before)
    cached.tokenizer = counter = CountingTokenizer(cached.tokenizer)
    cfg = OptimConfig()
    losses = {}
    for name, model in (("cached", cached), ("before", before)):
        optimizer = make_optimizer(model, cfg)
        model.train()
        losses[name] = [train_step(model, optimizer, x, y, None, cfg) for x, y in batches(len(taxonomy))]
    assert counter.calls == 1  # three steps, one tokenisation
    assert losses["cached"] == losses["before"]  # bit for bit
    x, _ = next(batches(len(taxonomy)))
    with torch.no_grad():
        assert torch.equal(cached.eval()(x)["probs"], before.eval()(x)["probs"])
    assert counter.calls == 1  # scoring reuses the training taxonomy's tokens


def test_tokens_are_cached_per_taxonomy_and_device():
    model = tiny()
    model.tokenizer = counter = CountingTokenizer(model.tokenizer)
    tokens, owner = model.prompt_tokens(model.taxonomy)
    assert model.prompt_tokens(model.taxonomy)[0] is tokens
    assert tokens.device == model.pixel_mean.device and owner.tolist() == list(range(len(model.taxonomy)))
    other = model.taxonomy.with_labels(["a swimming pool", "sea view"])
    assert model.prompt_tokens(other)[0].shape[0] == 2
    assert counter.calls == 2


def test_mkt_prompt_tuning_tokenises_its_template_once():
    model = tiny(head="mkt")
    model.begin_stage(2)
    prompt = model.head.prompt
    prompt.tokenizer = counter = CountingTokenizer(prompt.tokenizer)
    cfg = OptimConfig()
    objective, optimizer = make_objective(model, cfg), make_optimizer(model, cfg)
    model.train()
    for x, y in batches(len(model.taxonomy)):
        take_step(model, optimizer, x, y, None, cfg, objective=objective)
    assert counter.encodes == len(model.taxonomy)  # each name once, in the first step
    with torch.no_grad():
        cached = prompt.encode(model.clip, model.taxonomy.names)
        prompt._token_cache = None
        fresh = prompt.encode(model.clip, model.taxonomy.names)
    assert torch.equal(cached, fresh)


def test_class_embeddings_made_under_bf16_autocast_are_not_served_to_an_fp32_call():
    model = tiny(train_mode="image").eval()  # text frozen: class embeddings are cached
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.class_embeddings()
            assert model.class_embeddings() is low  # still cached within one precision
        full = model.class_embeddings()
        model._text_cache.clear()
        fresh = model.class_embeddings()
    assert full is not low
    assert full.dtype == torch.float32 and torch.equal(full, fresh)
    assert not torch.equal(full, low.float())  # bf16 differs: serving it would have moved the scores


def test_the_epoch_loss_read_once_equals_the_per_step_losses_read_every_step():
    model = tiny(head="mkt")  # stage 1: rank + distill terms, logged per epoch
    cfg = OptimConfig()
    objective, optimizer = make_objective(model, cfg), make_optimizer(model, cfg)
    model.train()
    tally, per_step, parts, sizes = LossTally(), [], [], []
    for x, y in batches(len(model.taxonomy), sizes=(8, 3, 8, 5)):
        loss = take_step(model, optimizer, x, y, None, cfg, objective=objective)
        assert loss.dim() == 0 and not loss.requires_grad
        tally.add(loss, len(x), objective.terms)
        per_step.append(float(loss))  # the old way: a number every step
        parts.append(objective.parts)
        sizes.append(len(x))
    w = np.array(sizes, dtype=float)
    assert tally.samples == sum(sizes)
    assert tally.mean() == pytest.approx(float(np.dot(per_step, w) / w.sum()), abs=1e-6)
    for k in ("rank", "distill"):
        old = float(np.dot([p[k] for p in parts], w) / w.sum())
        assert tally.part_means()[k] == pytest.approx(old, abs=1e-6)


def test_data_loading_pins_prefetches_and_copies_only_for_a_gpu():
    gpu = loader_options(CUDA)
    assert gpu["pin_memory"] is True and gpu["prefetch_batches"] > 1 and gpu["device"] == CUDA
    assert loader_options(CPU) == {}  # Ray's defaults: nothing to pin or copy on a CPU
    assert validation_prefetch(CUDA) > 1 and validation_prefetch(CPU) == 1


def test_adamw_is_fused_on_a_gpu_and_multi_tensor_elsewhere():
    assert adamw_options(CUDA) == {"fused": True}
    assert adamw_options(CPU) == {"foreach": True}
    optimizer = make_optimizer(tiny(), OptimConfig())
    assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)


def test_tf32_is_allowed_on_a_gpu_only():
    assert allows_tf32(CUDA) and not allows_tf32(CPU)
    before = torch.get_float32_matmul_precision()
    use_fast_float32(CPU)
    assert torch.get_float32_matmul_precision() == before


def test_the_per_worker_batch_size_is_a_train_flag_and_a_config_key():
    fields = dict(annotations="a.csv", taxonomy="t.yaml")
    assert TrainConfig(**fields).batch_size == 64  # the CPU default, unchanged
    assert TrainConfig(**fields, batch_size=256).optim().batch_size == 256
    inv = cli.parse(["train", "--annotations", "a.csv", "--taxonomy", "t.yaml", "--batch-size", "256"])
    assert inv.values["batch_size"] == 256
