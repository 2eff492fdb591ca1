"""Where a retag's start-up goes (`first_output_seconds`: actors up, model loaded, first batch), step by
step. Prints numbers; asserts nothing; not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_startup.py [--images 512] [--backbone mumic-tiny] [--cpus 2]

Steps, each in a fresh Ray worker process as the pipeline would pay it:
  ray.init (a local cluster), a bare actor up (process start, no imports), what a read / fetch task imports
  (pipelines.retag.dataset, .fetch), what an inference actor imports (pipelines.retag.infer: torch and
  open_clip), then in one actor: the imports one by one (torch, torchvision and timm, which open_clip
  imports, open_clip, mumic_core), the model load from its folder (checkpoint.load, and for comparison the
  random init it no longer runs), Scorer, the warm-up image, the first batches; then a whole `run_retag`
  over --images generated JPEGs (0: none) with its first_output_seconds. --backbone ViT-B-32 for a real size.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH = 256


def timed_import(module: str) -> tuple[float, bool]:
    """Seconds to import `module` here, and whether that brought torch in."""
    t0 = time.perf_counter()
    importlib.import_module(module)
    return time.perf_counter() - t0, "torch" in sys.modules


class Probe:
    """An actor that times, step by step, what `pipelines.retag.infer.Predictor.__init__` and its first
    calls do (each import step counts only what the ones before it did not bring)."""

    def steps(self, model_dir: str, threads: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for module in ("torch", "torchvision", "timm", "open_clip", "mumic_core.scoring"):
            seconds, _ = timed_import(module)
            out[f"import {module}"] = seconds
        import numpy as np
        import torch

        from mumic_core import checkpoint
        from mumic_core.model import ModelConfig, MuMIC
        from mumic_core.scoring import Scorer
        from mumic_core.taxonomy import Taxonomy

        torch.set_num_threads(threads)
        cfg = checkpoint.read_config(model_dir)
        t = time.perf_counter()
        MuMIC(ModelConfig.from_dict(cfg["model"]), Taxonomy.from_dict(cfg["taxonomy"]))
        out["(before: building the model with its random init, no longer done)"] = time.perf_counter() - t
        t = time.perf_counter()
        model = checkpoint.load(model_dir)
        out["checkpoint.load (read, sha256, build without random init, weights)"] = time.perf_counter() - t
        t = time.perf_counter()
        scorer = Scorer(model, device="cpu")
        out["Scorer(model) (device, class embeddings, precision)"] = time.perf_counter() - t
        size = scorer.image_size
        t = time.perf_counter()
        scorer.predict(np.zeros((1, 3, size, size), np.uint8))
        out["warm-up image (Predictor.__init__)"] = time.perf_counter() - t
        pixels = np.random.default_rng(0).integers(0, 256, (BATCH, 3, size, size), dtype=np.uint8)
        for which in ("first", "second"):
            t = time.perf_counter()
            scorer.predict(pixels)
            out[f"{which} batch of {BATCH}"] = time.perf_counter() - t
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--backbone", default="mumic-tiny")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from mumic_core import checkpoint, synthetic
    from mumic_core.model import MuMIC

    work = Path(tempfile.mkdtemp(prefix="mumic-startup-"))
    torch.manual_seed(0)
    checkpoint.save(MuMIC.create(synthetic.taxonomy(), backbone=args.backbone), work / "model")
    rows = synthetic.write_dataset(work / "images", max(args.images, 1), seed=5)
    pq.write_table(
        pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]}),
        work / "images" / "catalog.parquet",
    )
    print(f"# start-up, step by step ({args.backbone}, {args.cpus} CPUs, load average {os.getloadavg()[0]:.1f})")
    print("| step | seconds |\n|---|---:|")

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"| ray.init (local cluster) | {time.perf_counter() - t:.2f} |")
    try:
        t = time.perf_counter()
        bare = ray.remote(num_cpus=0.1)(Probe).remote()
        ray.get(bare.__ray_ready__.remote())
        print(f"| a bare actor up (worker process, no imports) | {time.perf_counter() - t:.2f} |")
        importer = ray.remote(num_cpus=0.1, max_calls=1)(timed_import)
        for module in ("pipelines.retag.dataset", "pipelines.retag.fetch", "pipelines.retag.infer"):
            seconds, torch_in = ray.get(importer.remote(module))
            print(f"| import {module} in a fresh worker{' (brings torch)' if torch_in else ''} | {seconds:.2f} |")
        probe = ray.remote(num_cpus=0.1)(Probe).remote()
        for step, seconds in ray.get(probe.steps.remote(str(work / "model"), 1)).items():
            print(f"| actor: {step} | {seconds:.2f} |")
        ray.kill(probe)
        ray.kill(bare)

        if not args.images:
            return
        from pipelines.retag import run_retag

        t = time.perf_counter()
        summary = run_retag(
            str(work / "images" / "catalog.parquet"), str(work / "model"), str(work / "out"),
            batch_size=BATCH, progress=False,
        )
        wall = time.perf_counter() - t
        print(f"| run_retag {args.images} images: first_output_seconds | {summary['first_output_seconds']:.2f} |")
        print(f"| run_retag {args.images} images: pipeline_seconds | {summary['pipeline_seconds']:.2f} |")
        print(f"| run_retag {args.images} images: wall | {wall:.2f} |")
    finally:
        ray.shutdown()
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (a shared machine: steps move by +-30 % between runs)")


if __name__ == "__main__":
    main()
