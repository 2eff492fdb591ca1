"""mumic against its peer, clip-retrieval's `inference`, on the same images, weights and batch size; and
mumic's precisions against each other. Prints numbers; asserts nothing; not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_peer.py [--sizes 1000 5000] [--batch 256] [--labels 32]
                                                    [--cache /tmp/mumic-peer] [--skip-peer]

Runs unattended: clip-retrieval 2.45 goes into its own virtual environment under --cache (not a project
dependency; it needs `setuptools<81` for `pkg_resources`). That venv reuses this venv's torch through a
.pth file (same torch build and threads for both tools, and no second multi-GB CUDA wheel); its own
pinned packages (numpy<2, open_clip<3, ...) shadow ours. One random-init open_clip ViT-B-32 is saved
once as safetensors; clip-retrieval loads it as `open_clip:ViT-B-32/<file>` (offline), mumic as the
`--pretrained` weights of a model folder. For each size N: N generated 256x256 photo-like JPEGs;
  - clip-retrieval inference (image embeddings only), wall clock of the process;
  - `mumic retag --full` (fp32, bf16, int8), wall clock of the process and its summary;
then the bare forward (Scorer.predict on decoded uint8 batches: one process on every thread, one
single-threaded process per core, and one thread in each precision), steady images/s from the difference
of the two sizes' walls, the ratios, and int8 / bf16 agreement with fp32 (top-10 labels on the benchmark's
images; mAP on a labelled generated set scored by a mumic-tiny trained here for 30 s).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

PEER = ("clip-retrieval==2.45.0", "setuptools<81")
WEIGHTS = "vit-b-32-random.safetensors"


def peer_venv(cache: Path) -> Path:
    """clip-retrieval's own venv (made once): its python."""
    venv = cache / "venv"
    python = venv / "bin" / "python"
    if (venv / ".ready").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    # appended after the venv's own site-packages: what pip installs there wins, torch comes from ours
    Path(site, "zz-mumic-torch.pth").write_text(ours + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER], check=True)
    (venv / ".ready").write_text(" ".join(PEER))
    return python


def make_images(folder: Path, n: int) -> Path:
    from gpu_check import photo_jpeg

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            path.write_bytes(photo_jpeg(256, 256, seed=i))
    return folder


def save_models(cache: Path, labels: int) -> tuple[Path, Path]:
    """One random-init ViT-B-32: as an open_clip safetensors file and as a mumic model folder."""
    import torch
    from safetensors.torch import save_file

    from mumic_core import checkpoint
    from mumic_core.model import MuMIC, build_clip, resolve_arch
    from mumic_core.taxonomy import Taxonomy

    weights, folder = cache / WEIGHTS, cache / f"mumic-vit-b-32-{labels}"
    if not weights.exists():
        torch.manual_seed(0)
        state = build_clip(resolve_arch("ViT-B-32")).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    config = folder / "config.json"
    if not config.exists() or json.loads(config.read_text())["format_version"] != checkpoint.FORMAT_VERSION:
        taxonomy = Taxonomy.from_dict({"labels": [f"product type {i}" for i in range(labels)]})
        checkpoint.save(MuMIC.create(taxonomy, backbone="ViT-B-32", pretrained=str(weights)), folder)
    return weights, folder


def run_peer(python: Path, images: Path, weights: Path, out: Path, batch: int) -> dict:
    cores = os.cpu_count() or 1
    cmd = [
        str(python), "-m", "clip_retrieval.cli", "inference",
        "--input_dataset", str(images), "--output_folder", str(out), "--input_format", "files",
        "--clip_model", f"open_clip:ViT-B-32/{weights.name}", "--batch_size", str(batch),
        "--num_prepro_workers", str(cores), "--enable_text", "False", "--enable_metadata", "False",
        "--output_partition_count", "1", "--use_jit", "False",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=weights.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    embeddings = list(out.rglob("*.npy"))
    rows = sum(np.load(p, mmap_mode="r").shape[0] for p in embeddings if "img_emb" in str(p))
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"clip-retrieval failed (exit {done.returncode}): {done.stderr[-1500:]}")
    return {"wall_s": round(wall, 2), "rows": rows}


def run_mumic(images: Path, model: Path, out: Path, batch: int, precision: str) -> dict:
    cmd = [
        sys.executable, "-m", "jobs.cli", "retag", "--catalog", str(images), "--model", str(model),
        "--output", str(out), "--full", "--batch-size", str(batch), "--precision", precision, "--json",
        "--no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:  # exit 134 after a correct summary is pyarrow + deltalake at interpreter exit (recorded as rc)
        summary = json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        raise RuntimeError(f"mumic retag failed (exit {done.returncode}): {done.stderr[-1500:]}") from None
    keys = ("rows_ok", "pipeline_seconds", "ray_start_seconds", "actors_ready_seconds", "first_output_seconds", "images_per_s")
    return {"wall_s": round(wall, 2), "rc": done.returncode, **{k: summary.get(k) for k in keys}}


def _forward_rate(args) -> float:
    model, batch, threads, seconds, precision = args
    from mumic_core.scoring import Scorer

    scorer = Scorer.load(model, device="cpu", num_threads=threads, precision=precision)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 3, 224, 224), dtype=np.uint8)
    scorer.predict(pixels[:8])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        scorer.predict(pixels, batch_size=batch)
        n += batch
    return n / (time.perf_counter() - t0)


def bare_forward(model: Path, batch: int, seconds: float = 20.0) -> dict:
    """The forward alone, on decoded uint8 batches: every thread in one process, and one single-threaded
    process per core (their rates add up: they run at once)."""
    cores = os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        one = pool.map(_forward_rate, [(str(model), batch, cores, seconds, "fp32")])[0]
    with ctx.Pool(cores) as pool:
        many = sum(pool.map(_forward_rate, [(str(model), batch, 1, seconds, "fp32")] * cores, chunksize=1))
    return {f"1 process x {cores} threads": round(one, 2), f"{cores} processes x 1 thread": round(many, 2)}


def forward_by_precision(model: Path, batch: int, seconds: float) -> dict:
    """The bare forward on one thread in each precision (CPU: bf16 is autocast, native on AVX512-BF16 / AMX)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return {p: round(pool.map(_forward_rate, [(str(model), batch, 1, seconds, p)])[0], 2) for p in ("fp32", "bf16", "int8")}


def agreement(model: Path, images: Path, n: int = 128) -> dict:
    """int8 and bf16 against fp32 on the benchmark's images: top-10 label overlap, largest score change."""
    from mumic_core.images import load_for_model
    from mumic_core.scoring import Scorer

    pixels = np.stack([load_for_model(p.read_bytes(), 224) for p in sorted(images.glob("*.jpg"))[:n]])
    scores = {p: Scorer.load(model, device="cpu", precision=p).predict(pixels, batch_size=64).scores
              for p in ("fp32", "int8", "bf16")}
    top = lambda s: np.argsort(-s, axis=1, kind="stable")[:, :10]  # noqa: E731
    out = {}
    for p in ("int8", "bf16"):
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top(scores["fp32"]), top(scores[p]), strict=True)])
        out[p] = {"top10_overlap": round(float(overlap), 4), "max_score_diff": float(np.abs(scores["fp32"] - scores[p]).max())}
    return out


def labelled_map(budget_s: float = 30.0) -> dict:
    """mAP of a mumic-tiny trained here on generated labelled images, scored in each precision."""
    import torch

    from mumic_core import metrics, synthetic
    from mumic_core.images import preprocess
    from mumic_core.model import MuMIC
    from mumic_core.scoring import Scorer
    from mumic_core.training import OptimConfig, fit

    torch.manual_seed(0)
    model = MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny")
    train, y_train = synthetic.make_arrays(1024, seed=1)
    test, y_test = synthetic.make_arrays(384, seed=2)
    x_train = np.stack([preprocess(im, 64) for im in train])
    x_test = np.stack([preprocess(im, 64) for im in test])
    fit(model, x_train, y_train, OptimConfig(epochs=6, batch_size=64, lr_image=2e-3, lr_text=2e-3), time_budget_s=budget_s)
    with tempfile.TemporaryDirectory() as tmp:
        from mumic_core import checkpoint

        checkpoint.save(model, Path(tmp) / "tiny")
        maps = {p: metrics.mean_average_precision(Scorer.load(Path(tmp) / "tiny", device="cpu", precision=p).predict(x_test).scores, y_test)
                for p in ("fp32", "int8", "bf16")}
    return {p: round(float(v), 4) for p, v in maps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--batch", type=int, default=64)  # the batch
    parser.add_argument("--labels", type=int, default=32)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "mumic-peer"))
    parser.add_argument("--skip-peer", action="store_true", help="mumic only (no clip-retrieval venv)")
    parser.add_argument("--forward-seconds", type=float, default=20.0)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"], help="of the mumic runs")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"# bench_peer: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    python = None if args.skip_peer else peer_venv(cache)
    weights, model = save_models(cache, args.labels)
    results: dict = {"sizes": {}}
    for n in args.sizes:
        images = make_images(cache / f"images-{n}", n)
        row: dict = {}
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            if python is not None:
                row["clip-retrieval"] = run_peer(python, images, weights, Path(tmp) / "peer", args.batch)
            for precision in args.precisions:
                row[f"mumic {precision}"] = run_mumic(images, model, Path(tmp) / f"mumic-{precision}", args.batch, precision)
        results["sizes"][n] = row
        print(json.dumps({n: row}), flush=True)
    results["bare_forward_fp32"] = bare_forward(model, args.batch, args.forward_seconds)
    results["bare_forward_1_thread"] = forward_by_precision(model, args.batch, args.forward_seconds / 2)
    results["agreement_with_fp32"] = agreement(model, cache / f"images-{args.sizes[0]}")
    results["labelled_map_mumic_tiny"] = labelled_map()
    results["load_average_after"] = round(os.getloadavg()[0], 1)
    report(results, args.sizes)
    sys.stdout.flush()
    os._exit(0)  # this process read no Delta table, but the spawned pools' torch may keep it from exiting


def report(results: dict, sizes: list[int]) -> None:
    """The table: wall per size, steady images/s from the walls' difference, ratios to the peer and to
    the best bare forward."""
    tools = list(results["sizes"][sizes[0]])
    best = max(results["bare_forward_fp32"].values())
    print("\n| tool | " + " | ".join(f"wall {n} (s)" for n in sizes) + " | steady images/s | / best forward |")
    print("|---|" + "---:|" * (len(sizes) + 2))
    steady = {}
    for tool in tools:
        walls = [results["sizes"][n][tool]["wall_s"] for n in sizes]
        rate = (sizes[-1] - sizes[0]) / (walls[-1] - walls[0]) if len(sizes) > 1 and walls[-1] > walls[0] else None
        steady[tool] = rate
        shown = f"{rate:.1f} | {rate / best:.2f}" if rate else "- | -"
        print(f"| {tool} | " + " | ".join(f"{w:.1f}" for w in walls) + f" | {shown} |")
    print(f"\nbest bare forward (fp32, same run): {best:.1f} images/s {results['bare_forward_fp32']}")
    print(f"bare forward on 1 thread by precision (images/s): {results['bare_forward_1_thread']}")
    if "clip-retrieval" in tools:
        for tool in (t for t in tools if t != "clip-retrieval"):
            ratios = [results["sizes"][n][tool]["wall_s"] / results["sizes"][n]["clip-retrieval"]["wall_s"] for n in sizes]
            print(f"{tool} wall / clip-retrieval wall: " + ", ".join(f"{n}: {r:.2f}" for n, r in zip(sizes, ratios, strict=True)))
    print(f"agreement with fp32 (ViT-B-32 random init, {results['agreement_with_fp32']})")
    print(f"mAP on a labelled generated set (mumic-tiny trained 30 s): {results['labelled_map_mumic_tiny']}")
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
