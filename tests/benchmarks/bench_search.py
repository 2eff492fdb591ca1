"""The search index at catalog scale: N simulated 512-d L2-normalised embeddings (clustered on a
low-dimensional structure, as image embeddings are, so that nearest neighbours mean something), indexed
with the parameters `mumic` uses (`pipelines/index/ann.py`).

Prints build time, memory (peak RSS, the index's own), size on disk, save / load time, query latency
(p50 / p95, k = 20, one query at a time, as `mumic search` asks), recall@20 against an exact blockwise
numpy scan, the cost of an update that replaces 1 % of the rows, recall after it, and the neighbour
search `mumic duplicates` does per image. Not part of the test run:

    python tests/benchmarks/bench_search.py [--n 1000000] [--dim 512] [--queries 1000] [--k 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.index import ann  # noqa: E402
from pipelines.index.search import OVERFETCH  # noqa: E402

LATENT, CLUSTERS = 48, 2000


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of this process (user + system): what the work costs, whatever else shares the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Simulated:
    """Embeddings = a random linear map of cluster centres plus spread in a 48-d latent space, plus a
    little 512-d noise, normalised: top-20 neighbours at cosine ~0.7-0.8, unrelated pairs near 0."""

    def __init__(self, dim: int, seed: int):
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((CLUSTERS, LATENT)).astype(np.float32)
        self.basis = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.dim = dim

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), np.float32)
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            z = self.centres[rng.integers(0, CLUSTERS, m)] + 0.5 * rng.standard_normal((m, LATENT), dtype=np.float32)
            x = z @ self.basis + 0.1 * rng.standard_normal((m, self.dim), dtype=np.float32)
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def exact_top_k(data: np.ndarray, keys: np.ndarray, queries: np.ndarray, k: int, block: int = 25_000) -> np.ndarray:
    """Keys of the exact top-k by inner product, blockwise (bounded memory)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_k = np.zeros((len(queries), 0), np.uint64)
    for start in range(0, len(data), block):
        sims = queries @ data[start : start + block].T
        part = np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
        kk = np.concatenate([best_k, keys[start : start + block][part]], axis=1)
        keep = np.argsort(-s, axis=1)[:, :k]
        best_s, best_k = np.take_along_axis(s, keep, 1), np.take_along_axis(kk, keep, 1)
    return best_k


def recall(found: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]))


SWEEP = (32, 64, 128, 256, 512)  # search expansions measured on the built graph


def search_all(index, queries: np.ndarray, k: int) -> tuple[list[np.ndarray], np.ndarray]:
    """One query at a time, as `mumic search` asks (k * OVERFETCH candidates, the best k kept)."""
    found, seconds = [], []
    for q in queries:
        t = time.perf_counter()
        keys, sims = ann.knn(index, q, max(k * OVERFETCH, k + 10))
        found.append(keys[0][np.argsort(-sims[0], kind="stable")][:k])
        seconds.append(time.perf_counter() - t)
    return found, np.asarray(seconds)


def sweep(index, queries: np.ndarray, truth: np.ndarray, k: int) -> dict[int, tuple[float, float]]:
    """Recall@k and p50 ms per search expansion, on the same graph (the expansion is a query-time knob)."""
    out = {}
    for ef in SWEEP:
        index.expansion_search = ef
        found, seconds = search_all(index, queries, k)
        out[ef] = (recall(found, truth, k), float(np.median(seconds) * 1e3))
        print(f"  expansion_search {ef}: recall@{k} {out[ef][0]:.4f}, p50 {out[ef][1]:.2f} ms", file=sys.stderr)
    index.expansion_search = ann.PARAMS.expansion_search
    return out


def build(data: np.ndarray, keys: np.ndarray) -> tuple[object, float, float]:
    """The index, wall seconds, CPU seconds."""
    index = ann.new_index(data.shape[1])
    t, c = time.perf_counter(), cpu_s()
    for start in range(0, len(data), 100_000):
        ann.add(index, keys[start : start + 100_000], data[start : start + 100_000])
        print(f"  added {min(start + 100_000, len(data))}/{len(data)} ({time.perf_counter() - t:.0f}s)", file=sys.stderr)
    return index, time.perf_counter() - t, cpu_s() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--update-share", type=float, default=0.01)
    ap.add_argument("--duplicates-sample", type=int, default=20_000, help="images whose neighbours are timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    out: dict = {"n": args.n, "dim": args.dim, "k": args.k, "params": ann.PARAMS.as_dict(), "threads": ann.threads()}
    sim = Simulated(args.dim, args.seed)
    data, keys = sim.draw(args.n, args.seed + 1), np.arange(args.n, dtype=np.uint64)
    queries = sim.draw(args.queries, args.seed + 2)
    rss_data = rss_mib()

    index, out["build_s"], out["build_cpu_s"] = build(data, keys)
    out["build_images_per_s"] = args.n / out["build_s"]
    out["rss_data_mib"], out["rss_after_build_mib"] = rss_data, rss_mib()
    out["peak_rss_build_mib"] = peak_rss_mib()  # the vectors (numpy) + the index, and the batches added
    out["index_memory_mib"] = index.memory_usage / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.usearch")
        t = time.perf_counter()
        ann.save(index, path)
        out["save_s"], out["disk_mib"] = time.perf_counter() - t, os.path.getsize(path) / 2**20
        t = time.perf_counter()
        viewed = ann.load(path, ann.PARAMS, view=True)
        out["view_s"] = time.perf_counter() - t
        found, seconds = search_all(viewed, queries[:50], args.k)  # the file memory-mapped, as search reads it
        out["view_query_p50_ms"] = float(np.median(seconds) * 1e3)
        del viewed

    t = time.perf_counter()
    truth = exact_top_k(data, keys, queries, args.k)
    out["exact_scan_s_per_query"] = (time.perf_counter() - t) / len(queries)
    c = cpu_s()
    found, seconds = search_all(index, queries, args.k)
    out["query_cpu_ms_mean"] = (cpu_s() - c) / len(queries) * 1e3
    out["query_p50_ms"], out["query_p95_ms"] = (float(np.percentile(seconds, p) * 1e3) for p in (50, 95))
    out["recall_at_k"] = recall(found, truth, args.k)
    out["expansion_sweep"] = sweep(index, queries, truth, args.k)

    # a night that re-tags 1 %: their old vectors removed, their new ones added under new keys
    rng = np.random.default_rng(args.seed + 3)
    changed = rng.choice(args.n, int(args.n * args.update_share), replace=False)
    fresh = sim.draw(len(changed), args.seed + 4)
    new_keys = np.arange(args.n, args.n + len(changed), dtype=np.uint64)
    t, c = time.perf_counter(), cpu_s()
    ann.remove(index, keys[changed])
    ann.add(index, new_keys, fresh)
    out["update_s"], out["update_cpu_s"], out["update_rows"] = time.perf_counter() - t, cpu_s() - c, len(changed)
    data[changed], keys[changed] = fresh, new_keys
    truth = exact_top_k(data, keys, queries, args.k)
    out["recall_at_k_after_update"] = recall(search_all(index, queries, args.k)[0], truth, args.k)

    sample = data[: args.duplicates_sample]
    t, c = time.perf_counter(), cpu_s()
    ann.knn(index, sample, 17)  # `mumic duplicates`: 16 neighbours + itself per image
    out["duplicates_s_per_1000_images"] = (time.perf_counter() - t) / len(sample) * 1000
    out["duplicates_cpu_s_per_1000_images"] = (cpu_s() - c) / len(sample) * 1000
    out["peak_rss_mib"] = peak_rss_mib()
    report(out, args)


def report(out: dict, args) -> None:
    print(f"usearch HNSW, {out['params']}, {out['threads']} threads, N={args.n}, dim={args.dim}, k={args.k}")
    for key, value in out.items():
        if key != "params":
            print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
