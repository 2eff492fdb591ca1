"""The sections of tests/benchmarks/gpu_check.sh, one per call: each measures one thing on the GPU and
writes OUT/<section>.json when it finishes. Prints numbers; asserts nothing; not collected by pytest.

    python tests/benchmarks/gpu_check.py SECTION --out DIR [--cpu-smoke]

--cpu-smoke runs every section on the CPU at toy sizes (mumic-tiny, a few images): a dry run that proves
the script works before GPU time is spent on it. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

SIZES = {"256x256": (256, 256), "1024x768": (1024, 768), "2000x1500": (2000, 1500)}


class Setup:
    """What a section runs on: the device, the backbone, how much."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.backbone = "mumic-tiny" if smoke else "ViT-B-32"
        self.batches = (8, 16) if smoke else (128, 256, 512, 1024)
        self.seconds = 1.0 if smoke else 4.0  # per measured configuration
        self.retag_images = 64 if smoke else 6000
        self.labels = 20 if smoke else 1000

    def model_dir(self, work: Path) -> Path:
        """A random-init model of the backbone with `labels` labels, saved once per work folder."""
        import torch

        from mumic_core import checkpoint
        from mumic_core.model import MuMIC
        from mumic_core.taxonomy import Taxonomy

        folder = work / f"model-{self.backbone}"
        if not (folder / "config.json").exists():
            torch.manual_seed(0)
            taxonomy = Taxonomy.from_dict({"labels": [f"product type {i}" for i in range(self.labels)]})
            checkpoint.save(MuMIC.create(taxonomy, backbone=self.backbone), folder)
        return folder


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG that costs libjpeg what a photo does: smooth gradients, texture and noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 60], -1)
    base += 40 * (np.sin(x / (11 + seed % 7)) * np.cos(y / 23.0))[..., None]
    base += rng.normal(0, 10, base.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


# ---- sections ---------------------------------------------------------------------------------------


def section_versions(setup: Setup, work: Path) -> dict:
    import open_clip
    import ray
    import torch
    import torchvision

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": torchvision.__version__,
        "open_clip": open_clip.__version__,
        "ray": ray.__version__,
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
        }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"]
        out["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    return out


def section_predictor(setup: Setup, work: Path) -> dict:
    """Scorer.predict on the device at each batch size, auto precision (bf16 on a GPU) and fp32 at 256."""
    import torch

    from mumic_core.scoring import Scorer

    folder = setup.model_dir(work)
    results = []
    for precision, batches in (("auto", setup.batches), ("fp32", setup.batches[1:2])):
        scorer = Scorer.load(folder, device=setup.device, precision=precision)
        size = scorer.image_size
        for batch in batches:
            pixels = np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
            if setup.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            scorer.predict(pixels, batch_size=batch)  # warm-up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < setup.seconds:
                scorer.predict(pixels, batch_size=batch)
                n += batch
            sync(setup.device)
            rate = n / (time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**20 if setup.device == "cuda" else None
            results.append(
                {"precision": scorer.precision, "batch": batch, "images_per_s": round(rate, 1), "peak_mib": peak}
            )
            print(f"predictor {scorer.precision} batch {batch}: {rate:.0f} images/s, peak {peak} MiB", flush=True)
        del scorer
    return {"backbone": setup.backbone, "labels": setup.labels, "from": "uint8 pixels in host memory", "runs": results}


def section_agreement(setup: Setup, work: Path) -> dict:
    """fp32 against bf16 over the whole forward (the old rule: the head in bf16) and against bf16 with an
    fp32 head (the rule now): top-10 overlap, largest probability and logit differences, saturated probs."""
    import torch

    from mumic_core.scoring import Scorer

    scorer = Scorer.load(setup.model_dir(work), device=setup.device, precision="fp32")
    size = scorer.image_size
    pixels = torch.from_numpy(
        np.random.default_rng(1).integers(0, 256, (64 if setup.smoke else 512, 3, size, size), dtype=np.uint8)
    )
    model = scorer.model
    with torch.no_grad():
        fp32 = model(pixels)
        with torch.autocast(setup.device, dtype=torch.bfloat16):
            whole = model(pixels)
        scorer.precision = "bf16"
        with scorer._autocast():
            tower = model(pixels)

    def compare(other: dict) -> dict:
        a, b = fp32["probs"].float().cpu().numpy(), other["probs"].float().cpu().numpy()
        top = lambda s: np.argsort(-s, axis=1, kind="stable")[:, :10]  # noqa: E731
        overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top(a), top(b), strict=True)])
        logit_gap = (fp32["logits"].float() - other["logits"].float()).abs().max().item()
        return {
            "top10_overlap": round(float(overlap), 4),
            "max_prob_diff": float(np.abs(a - b).max()),
            "max_logit_diff": logit_gap,
            "probs_dtype": str(other["probs"].dtype),
            "probs_equal_to_1": int((b >= 1.0).sum()),
        }

    return {
        "tau": float(model.log_tau.exp()),
        "bf16_whole_forward": compare(whole),
        "bf16_tower_fp32_head": compare(tower),
    }


def section_breakdown(setup: Setup, work: Path) -> dict:
    """One batch through the retag stages' code, timed step by step (device synchronised after each)."""
    import pyarrow as pa
    import torch

    from pipelines.retag.decode import decode_batch, pixels_of
    from pipelines.retag.infer import Predictor

    batch = setup.batches[1]
    predictor = Predictor(str(setup.model_dir(work)), top_k=10, device=setup.device, num_threads=1)
    scorer = predictor.scorer
    datas = [photo_jpeg(1024, 768, seed=i % 16) for i in range(batch)]
    table = pa.table({"image_id": [str(i) for i in range(batch)], "data": pa.array(datas, pa.binary())})
    steps: dict[str, float] = {}

    def timed(name, fn):
        sync(setup.device)
        t = time.perf_counter()
        value = fn()
        sync(setup.device)
        steps[name] = round(time.perf_counter() - t, 4)
        return value

    decoded = timed("decode 1024x768 JPEGs, one CPU core", lambda: decode_batch(table, scorer.image_size))
    predictor(decoded)  # warm-up of the whole call
    ok, pixels = timed("pixels_of (arrow → numpy view)", lambda: pixels_of(decoded, scorer.image_size))
    on_device = timed("host → device copy", lambda: torch.from_numpy(pixels).to(scorer.device))
    timed("model forward + scores back on the host", lambda: scorer.predict(on_device.cpu().numpy(), batch_size=batch))
    timed("Predictor.__call__ whole (pixels → tag rows)", lambda: predictor(decoded))
    return {"batch": batch, "seconds": steps, "images_per_s_of_predictor_call": round(batch / steps[
        "Predictor.__call__ whole (pixels → tag rows)"], 1)}


def _decode_rate(args) -> float:
    """images/s of load_for_model in this process, timed here (a pool's start-up left out)."""
    datas, size, seconds, margin = args
    from mumic_core import images

    images.JPEG_DRAFT_MARGIN = margin
    images.load_for_model(datas[0], size)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for data in datas:
            images.load_for_model(data, size)
        n += len(datas)
    return n / (time.perf_counter() - t0)


def section_decode(setup: Setup, work: Path) -> dict:
    """CPU decode + preprocess to 224 px: per source size, 1 core and a pool of every core, 2x vs 1x draft."""
    seconds = 0.5 if setup.smoke else 2.0
    procs = os.cpu_count() or 1
    out = {"cores": procs, "runs": []}
    for name, (w, h) in SIZES.items():
        datas = [photo_jpeg(w, h, seed=s) for s in range(4)]
        for margin in (2, 1):
            one = _decode_rate((datas, 224, seconds, margin))
            with mp.get_context("spawn").Pool(procs) as pool:  # all at once: the rates add up
                many = sum(pool.map(_decode_rate, [(datas, 224, seconds, margin)] * procs, chunksize=1))
            out["runs"].append(
                {"size": name, "draft_margin": margin, "one_core": round(one, 1), "all_cores": round(many, 1),
                 "ms_per_image_one_core": round(1000 / one, 2)}
            )
            print(f"decode {name} draft x{margin}: {one:.0f}/s one core, {many:.0f}/s on {procs}", flush=True)
    return out


def section_nvjpeg(setup: Setup, work: Path) -> dict:
    """torchvision.io.decode_jpeg on the device (nvJPEG on a GPU) + a resize/crop on the device, against
    the CPU path: images/s, and the largest pixel difference from mumic_core.images.load_for_model."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision.io import decode_jpeg

    from mumic_core.images import load_for_model

    batch = 16 if setup.smoke else 256
    datas = [photo_jpeg(1024, 768, seed=i % 16) for i in range(batch)]
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]

    def gpu_pixels() -> torch.Tensor:
        frames = decode_jpeg(encoded, device=setup.device)  # list of uint8 [3, H, W]
        out = []
        for frame in frames:
            h, w = frame.shape[-2:]
            scale = 224 / min(h, w)
            size = (max(224, round(h * scale)), max(224, round(w * scale)))
            resized = F.interpolate(frame[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
            top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
            out.append(resized[0, :, top : top + 224, left : left + 224].round().clamp(0, 255).to(torch.uint8))
        return torch.stack(out)

    gpu_pixels()  # warm-up (nvJPEG handles, kernels)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < (1.0 if setup.smoke else 4.0):
        result = gpu_pixels()
        n += batch
    sync(setup.device)
    rate = n / (time.perf_counter() - t0)
    ours = np.stack([load_for_model(d, 224) for d in datas]).astype(np.int16)
    diff = np.abs(result.cpu().numpy().astype(np.int16) - ours)
    return {
        "torchvision": torchvision.__version__,
        "device": setup.device,
        "images_per_s": round(rate, 1),
        "max_pixel_diff_vs_pil": int(diff.max()),
        "mean_pixel_diff_vs_pil": round(float(diff.mean()), 3),
    }


class GpuBusy:
    """GPU utilisation sampled from nvidia-smi every 200 ms while a block runs (absent: no samples)."""

    def __init__(self):
        self.samples: list[int] = []
        self.proc = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line.strip()))

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _write_jpeg(args) -> None:
    path, seed = args
    Path(path).write_bytes(photo_jpeg(1024, 768, seed=seed, quality=88))


def section_retag(setup: Setup, work: Path) -> dict:
    """A whole run_retag over local 1024x768 JPEGs on this machine's GPU(s), GPU busy share sampled."""
    import ray

    from pipelines.retag import run_retag

    folder = work / "retag-images"
    folder.mkdir(exist_ok=True)
    todo = [(str(folder / f"{i:06d}.jpg"), i % 64) for i in range(setup.retag_images)]
    with mp.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(_write_jpeg, todo, chunksize=64)
    ray.init(include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with GpuBusy() as busy:
            t0 = time.perf_counter()
            summary = run_retag(str(folder), str(setup.model_dir(work)), str(work / "retag-out"), batch_size=256,
                                full=True, progress=True)
            wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    steady = busy.samples[len(busy.samples) // 4 :]  # past the start-up
    keys = ("rows_ok", "rows_error", "pipeline_seconds", "ray_start_seconds", "actors_ready_seconds", "first_output_seconds", "images_per_s")
    return {
        **{k: summary.get(k) for k in keys},
        "wall_s": round(wall, 2),
        "images": setup.retag_images,
        "gpu_busy_mean_pct": round(float(np.mean(steady)), 1) if steady else None,
        "gpu_busy_samples": len(busy.samples),
        "steady_images_per_s": _steady(summary),
    }


def _steady(summary: dict) -> float | None:
    """images/s after the first output (the first batch's rows counted in: a slight overestimate)."""
    after = summary["pipeline_seconds"] - summary["first_output_seconds"]
    return round(summary["rows_ok"] / after, 1) if after > 1.0 else None


def section_train(setup: Setup, work: Path) -> dict:
    """A few bf16 training steps on the device, then a checkpoint round trip (same scores after load)."""
    import torch

    from mumic_core import checkpoint, synthetic
    from mumic_core.images import preprocess
    from mumic_core.model import MuMIC
    from mumic_core.scoring import Scorer
    from mumic_core.training import OptimConfig, make_optimizer, train_step

    torch.manual_seed(0)
    model = MuMIC.create(synthetic.taxonomy(), backbone=setup.backbone).to(setup.device)
    size = model.config.image_size
    images, labels = synthetic.make_arrays(32 if setup.smoke else 128, seed=3)
    pixels = torch.from_numpy(np.stack([preprocess(im, size) for im in images])).to(setup.device)
    target = torch.from_numpy(labels).float().to(setup.device)
    cfg = OptimConfig(epochs=1, batch_size=len(images))
    optimizer = make_optimizer(model, cfg)
    model.train()
    losses, t0 = [], time.perf_counter()
    for _ in range(3 if setup.smoke else 8):
        losses.append(train_step(model, optimizer, pixels, target, None, cfg, autocast_device=setup.device))
    sync(setup.device)
    step_s = (time.perf_counter() - t0) / len(losses)
    folder = work / "trained"
    checkpoint.save(model.cpu(), folder)
    before = Scorer(model, device=setup.device, precision="fp32").predict(pixels.cpu().numpy()).scores
    after = Scorer.load(folder, device=setup.device, precision="fp32").predict(pixels.cpu().numpy()).scores
    return {
        "losses": [round(x, 4) for x in losses],
        "seconds_per_step": round(step_s, 3),
        "batch": len(images),
        "round_trip_max_score_diff": float(np.abs(before - after).max()),
    }


SECTIONS = {
    "versions": section_versions,
    "predictor": section_predictor,
    "agreement": section_agreement,
    "breakdown": section_breakdown,
    "decode": section_decode,
    "nvjpeg": section_nvjpeg,
    "retag": section_retag,
    "train": section_train,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mumic-gpu-check"))
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = SECTIONS[args.section](Setup(args.cpu_smoke), work)
    result = {"section": args.section, "smoke": args.cpu_smoke, "seconds": round(time.perf_counter() - t0, 2), **result}
    (out / f"{args.section}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, default=str), flush=True)
    sys.stdout.flush()
    os._exit(0)  # pyarrow + deltalake may abort at interpreter exit after a Delta read: the JSON is written


if __name__ == "__main__":
    raise SystemExit(main())
