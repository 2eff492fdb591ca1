"""Does the review queue pick better images to annotate than chance? An active-learning round on ccp.

Per seed: train mumic-tiny on S random train images, score the rest of the train split (the pool), take
K of the pool by the review queue (`pipelines.review.review_queue`, the function `mumic review` uses),
K at random, and K by plain uncertainty without the spread across labels (ablation); "correct" them with
their true labels, retrain seed+K from the same initial weights, and compare val (and test) mAP:

    .venv/bin/python tests/benchmarks/bench_review.py [--seeds 0 1 2] [--seed-size 200] [--k 100] [--epochs 20]

Training is the plain in-process loop (`mumic_core.training.fit`, one torch thread) on pixels decoded once
by the project's decode path (`mumic_core.images.load_many` at the model's input size); thresholds are
tuned on val after each training, as `mumic train` does. Prints a table and writes RESULTS-review.md
(--out); asserts nothing. ccp is read-only: the decoded pixels are cached under --cache.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mumic_core import images, metrics  # noqa: E402
from mumic_core.model import MuMIC  # noqa: E402
from mumic_core.scoring import Scorer  # noqa: E402
from mumic_core.taxonomy import Taxonomy  # noqa: E402
from mumic_core.training import OptimConfig, fit  # noqa: E402
from pipelines import storage  # noqa: E402
from pipelines.annotations import load as load_annotations  # noqa: E402
from pipelines.review import margins, review_queue  # noqa: E402

HERE = Path(__file__).parent
CCP = HERE.parents[1].parent / "shared" / "data" / "ccp"
ARMS = ("seed only", "+ review queue", "+ random", "+ uncertain, no spread")


def decoded(data_dir: Path, size: int, cache: Path) -> tuple[dict, Taxonomy]:
    """Every annotated ccp image decoded once at the model's input size, split by the file's split."""
    taxonomy = Taxonomy.load(data_dir / "taxonomy.yaml")
    ann = load_annotations(str(data_dir / "annotations.csv"), taxonomy)
    frame = ann.frame
    cached = cache / f"ccp-{size}.npz"
    if cached.exists():
        pixels = np.load(cached)["pixels"]
    else:
        reads = storage.read_many(list(frame["uri"]), threads=4)
        pixels, ok, errors = images.load_many([b for b, _ in reads], size)
        if not ok.all():
            raise SystemExit(f"{(~ok).sum()} ccp images did not decode: {[e for e in errors if e][:3]}")
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(cached, pixels=pixels)
    labels = ann.label_matrix()
    splits = {
        s: {"ids": list(frame["image_id"][m]), "x": pixels[m], "y": labels[m]}
        for s in ("train", "val", "test")
        for m in [(frame["split"] == s).to_numpy()]
    }
    return splits, taxonomy


def train(init: MuMIC, x: np.ndarray, y: np.ndarray, val: dict, args, seed: int) -> Scorer:
    """A copy of `init` trained on (x, y), thresholds tuned on val; ready to score."""
    model = copy.deepcopy(init)
    cfg = OptimConfig(epochs=args.epochs, batch_size=32, lr_image=2e-3, lr_text=2e-3, seed=seed)
    fit(model, x, y, cfg)
    scorer = Scorer(model, "cpu")
    scorer.model.set_thresholds(metrics.tune_thresholds(scorer.predict(val["x"]).scores, val["y"]))
    return scorer


def mean_ap(scorer: Scorer, split: dict) -> float:
    return float(metrics.mean_average_precision(scorer.predict(split["x"]).scores, split["y"]))


def picks(arm: str, scorer: Scorer, pool: dict, k: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of the pool an arm sends to the annotator."""
    if arm == "+ random":
        return rng.choice(len(pool["ids"]), size=k, replace=False)
    m = margins(scorer.predict(pool["x"]).scores, scorer.thresholds)  # [P, C]
    if arm == "+ review queue":
        return np.array([p.row for p in review_queue(m, pool["ids"], k)])
    return np.argsort(m.min(axis=1), kind="stable")[:k]  # each image's closest call, labels ignored


def one_seed(splits: dict, taxonomy: Taxonomy, args, seed: int) -> dict:
    torch.manual_seed(seed)
    init = MuMIC.create(taxonomy, backbone="mumic-tiny")
    rng = np.random.default_rng(seed)
    train_split, val, test = splits["train"], splits["val"], splits["test"]
    order = rng.permutation(len(train_split["ids"]))
    seed_rows, pool_rows = order[: args.seed_size], order[args.seed_size :]
    pool = {key: [train_split["ids"][i] for i in pool_rows] if key == "ids" else train_split[key][pool_rows]
            for key in ("ids", "x", "y")}
    t0 = time.perf_counter()
    base = train(init, train_split["x"][seed_rows], train_split["y"][seed_rows], val, args, seed)
    out = {"seed only": {"val": mean_ap(base, val), "test": mean_ap(base, test), "positives": 0}}
    for arm in ARMS[1:]:
        rows = picks(arm, base, pool, args.k, np.random.default_rng(seed))
        x = np.concatenate([train_split["x"][seed_rows], pool["x"][rows]])
        y = np.concatenate([train_split["y"][seed_rows], pool["y"][rows]])  # the correction: true labels
        scorer = train(init, x, y, val, args, seed)
        out[arm] = {
            "val": mean_ap(scorer, val),
            "test": mean_ap(scorer, test),
            "positives": int(pool["y"][rows].sum()),
            "labels_covered": int((pool["y"][rows].sum(axis=0) > 0).sum()),
        }
    out["seconds"] = time.perf_counter() - t0
    print(f"seed {seed}: " + ", ".join(f"{a} {out[a]['val']:.4f}" for a in ARMS) + f" ({out['seconds']:.0f} s)",
          flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(CCP))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seed-size", type=int, default=200, help="train images the first model sees")
    p.add_argument("--k", type=int, default=100, help="images sent to review per arm")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--cache", default="/tmp/mumic-bench-review")
    p.add_argument("--out", default=str(HERE / "RESULTS-review.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    splits, taxonomy = decoded(Path(args.data), 64, Path(args.cache))
    sizes = ", ".join(f"{s} {len(v['ids'])}" for s, v in splits.items())
    print(f"ccp: {sizes}; decoded in {time.perf_counter() - t0:.0f} s", flush=True)
    prior = {s: float(metrics.mean_average_precision(  # every image scored by the train split's label rates
        np.broadcast_to(splits["train"]["y"].mean(0), splits[s]["y"].shape).copy(), splits[s]["y"])) for s in ("val", "test")}
    print(f"label-prior baseline: val mAP {prior['val']:.4f}, test mAP {prior['test']:.4f}", flush=True)
    results = {seed: one_seed(splits, taxonomy, args, seed) for seed in args.seeds}
    table = summary(results) + [f"| label prior (no model) | {prior['val']:.4f} | {prior['test']:.4f} | | | | |"]
    print("\n".join(table))
    write_markdown(args, results, table, time.perf_counter() - t0)
    return 0


def _mean_spread(values: list[float]) -> str:
    v = np.asarray(values)
    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"


def summary(results: dict) -> list[str]:
    seeds = list(results)
    lines = [
        "| images trained on | val mAP (mean ± sd) | test mAP (mean ± sd) | val mAP per seed | "
        "Δ val mAP vs random per seed | positives in the K | labels with a positive in the K |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for arm in ARMS:
        val = [results[s][arm]["val"] for s in seeds]
        test = [results[s][arm]["test"] for s in seeds]
        delta = ", ".join(f"{results[s][arm]['val'] - results[s]['+ random']['val']:+.4f}" for s in seeds)
        pos = np.mean([results[s][arm]["positives"] for s in seeds])
        cov = np.mean([results[s][arm].get("labels_covered", 0) for s in seeds])
        lines.append(
            f"| {arm} | {_mean_spread(val)} | {_mean_spread(test)} | {', '.join(f'{v:.4f}' for v in val)} | "
            f"{delta if arm != 'seed only' else '-'} | {pos:.0f} | {cov:.0f} |"
        )
    return lines


def write_markdown(args, results: dict, table: list[str], seconds: float) -> None:
    wins = sum(results[s]["+ review queue"]["val"] > results[s]["+ random"]["val"] for s in results)
    lines = [
        "# Review queue vs random images (tests/benchmarks/bench_review.py)",
        "",
        f"`.venv/bin/python tests/benchmarks/bench_review.py --seeds {' '.join(map(str, args.seeds))} "
        f"--seed-size {args.seed_size} --k {args.k} --epochs {args.epochs}`",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, {os.cpu_count()} CPU "
        f"cores shared with other jobs, no GPU, torch {torch.__version__}, {args.threads} torch thread(s); "
        f"{seconds / 60:.1f} min in all. ccp (`../shared/data/ccp`: 660 train / 195 val / 101 test, 53 labels), "
        f"mumic-tiny from random weights at 64x64, {args.epochs} epochs, batch 32, lr 2e-3. Per seed: a seed "
        f"set of {args.seed_size} random train images, a pool of the other {660 - args.seed_size}; K = {args.k} "
        "pool images added with their true labels (the simulated correction); every model of a seed starts "
        "from the same initial weights and the same shuffling seed.",
        "",
        *table,
        "",
        f"The review queue beat random images on val mAP in {wins} of {len(results)} seeds.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
