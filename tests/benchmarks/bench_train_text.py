"""Training steps over a large taxonomy: how much of a `both`-mode step is the text side (tokenising the
prompts, then the text tower over all of them), against `image` mode, where the class embeddings are cached.

    .venv/bin/python tests/benchmarks/bench_train_text.py [--labels 1000] [--batch-size 64] [--steps 8]

mumic-tiny (random init), random 64x64 pixels. Three cases in one process, stepping in turn (so a shared
machine's load falls on all alike): `both` tokenising the prompts every step (as before issue 11), `both`
with the tokens cached, and `image`. Prints wall and CPU ms per step (median of --steps after 2 warm-up),
the tokenizer's calls and ms per step. Asserts nothing (machines differ); the figures go into
tests/benchmarks/RESULTS-train.md by hand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mumic_core.model import MuMIC  # noqa: E402
from mumic_core.taxonomy import Taxonomy  # noqa: E402
from mumic_core.training import OptimConfig, make_objective, make_optimizer, take_step  # noqa: E402


class TimedTokenizer:
    """The model's tokenizer, counting its calls and the time spent in them."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.seconds = tokenizer, 0, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.tokenizer(*args, **kwargs)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def tokenising_every_step(model: MuMIC):
    """`prompt_embeddings` as it was before the token cache (issue 11): the tokenizer on every call."""

    def prompt_embeddings(taxonomy: Taxonomy) -> torch.Tensor:
        prompts = [taxonomy.prompts_for(label) for label in taxonomy.labels]
        emb = model.encode_texts([p for ps in prompts for p in ps])
        owner = torch.tensor([i for i, ps in enumerate(prompts) for _ in ps])
        summed = torch.zeros(len(prompts), emb.shape[1]).index_add(0, owner, emb)
        return F.normalize(summed, dim=-1)

    return prompt_embeddings


CASES = {  # name: (train_mode, tokenise every step)
    "both, tokenising every step (before)": ("both", True),
    "both, tokens cached (now)": ("both", False),
    "image (class embeddings cached)": ("image", False),
}


def setup(labels: int, batch: int, mode: str, old_tokens: bool):
    torch.manual_seed(0)
    taxonomy = Taxonomy.from_names([f"label number {i}" for i in range(labels)])
    model = MuMIC.create(taxonomy, backbone="mumic-tiny", train_mode=mode)
    if old_tokens:
        model.prompt_embeddings = tokenising_every_step(model)
    model.tokenizer = TimedTokenizer(model.tokenizer)
    cfg = OptimConfig()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8, generator=g)
    target = (torch.rand(batch, labels, generator=g) < 0.01).float()
    model.train()
    optimizer, objective = make_optimizer(model, cfg), make_objective(model, cfg)
    step = lambda: take_step(model, optimizer, pixels, target, None, cfg, objective=objective)  # noqa: E731
    return step, model.tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"mumic-tiny, {args.labels} labels (1 template), batch {args.batch_size}, {args.threads} "
          f"thread(s); the cases step in turn, median of {args.steps} steps after 2 warm-up", flush=True)
    cases = {name: setup(args.labels, args.batch_size, *case) for name, case in CASES.items()}
    wall: dict[str, list[float]] = {n: [] for n in cases}
    cpu: dict[str, list[float]] = {n: [] for n in cases}
    for i in range(2 + args.steps):
        for name, (step, tokenizer) in cases.items():
            if i == 2:
                tokenizer.calls, tokenizer.seconds = 0, 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if i >= 2:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    for name, (_, tokenizer) in cases.items():
        print(f"  {name:38s} {1000 * statistics.median(wall[name]):8.1f} ms/step wall, "
              f"{1000 * statistics.median(cpu[name]):8.1f} ms/step CPU; tokenizer {tokenizer.calls} calls "
              f"in {args.steps} steps, {1000 * tokenizer.seconds / args.steps:.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
